"""Builds report.pdf from a results folder (the demo's, or one with the same layout from real data), answering each
question of the homework's report with the numbers and figures found there and saying where every number comes from.

    python3 make_report.py --results outputs/demo --out report.pdf
"""
from __future__ import annotations

import argparse
import os
import textwrap
from typing import List, Optional, Sequence

from common import UserError, atomic_dir, atomic_write, check_output_file, read_json, run_main
from p1_templates import REPORT_TEMPLATES

PAGE = (8.27, 11.69)  # A4 in inches
MARGIN = 0.07
WRAP = 100

CLIP_WHY = (
    "CLIP learns one embedding space for images and text from hundreds of millions of image-caption pairs with a "
    "contrastive loss: the caption of an image must be closer to it than every other caption in the batch. A class "
    "is therefore not an index into a fixed output layer, as in a VGG or ResNet classifier, but a sentence; any set "
    "of classes becomes a classifier by embedding one prompt per class and taking the most similar one. Because the "
    "captions cover open-ended concepts, styles and contexts, the image features are general, and the text encoder "
    "already knows the names of classes it never saw as labels. Prompt ensembling (averaging the class embedding "
    "over templates such as 'a photo of a {}.') reduces the mismatch between a bare class name and the captions "
    "CLIP was trained on.")


class Report:
    """A4 pages of wrapped text, tables and images, written with matplotlib's PDF backend."""

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.pages: List = []
        self._new_page()

    def _new_page(self):
        self.figure = self.plt.figure(figsize=PAGE)
        self.pages.append(self.figure)
        self.y = 1 - MARGIN

    def _room(self, height: float):
        if self.y - height < MARGIN:
            self._new_page()

    def heading(self, text: str, size: int = 14):
        self._room(0.05)
        self.figure.text(MARGIN, self.y, text, fontsize=size, weight="bold", va="top")
        self.y -= 0.035 if size >= 14 else 0.028

    def paragraph(self, text: str, size: int = 9):
        for line in textwrap.wrap(text, WRAP) or [""]:
            self._room(0.018)
            self.figure.text(MARGIN, self.y, line, fontsize=size, va="top")
            self.y -= 0.016
        self.y -= 0.008

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]):
        height = 0.025 * (len(rows) + 1)
        self._room(height + 0.01)
        ax = self.figure.add_axes((MARGIN, self.y - height, 1 - 2 * MARGIN, height))
        ax.axis("off")
        table = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), loc="upper left", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        self.y -= height + 0.015

    def image(self, path: str, height: float = 0.3, caption: Optional[str] = None):
        import matplotlib.image as mpimg

        if not os.path.isfile(path):
            self.paragraph("(figure missing: %s)" % path)
            return
        picture = mpimg.imread(path)
        aspect = picture.shape[1] / picture.shape[0] * PAGE[1] / PAGE[0]
        width = min(1 - 2 * MARGIN, height * aspect)
        height = width / aspect
        self._room(height + 0.03)
        ax = self.figure.add_axes((MARGIN, self.y - height, width, height))
        ax.imshow(picture)
        ax.axis("off")
        self.y -= height + 0.01
        if caption:
            self.paragraph(caption, size=8)

    def save(self, path: str):
        from matplotlib.backends.backend_pdf import PdfPages

        with atomic_write(path, "wb") as f:
            with PdfPages(f) as pdf:
                for page in self.pages:
                    pdf.savefig(page)
        for page in self.pages:
            self.plt.close(page)


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else ("%.*f" % (digits, value) if isinstance(value, float) else str(value))


def prompt_analysis(prompts: Sequence[dict]) -> str:
    """What the prompt table shows, in words that follow the numbers rather than a fixed story."""
    acc = {p["templates"]: p["accuracy"] for p in prompts}
    photo, negated, noise = (acc.get(text) for _, text in REPORT_TEMPLATES)
    parts = []
    if photo is not None and negated is not None:
        gap = 100 * (negated - photo)
        parts.append("The negated prompt changes accuracy by %+.1f points against 'This is a photo of {}'%s." % (
            gap, ": CLIP's text encoder, trained on captions that rarely negate, reads 'not a photo of X' mostly as "
                 "'X'" if abs(gap) < 3 else ""))
    if photo is not None and noise is not None:
        parts.append("'No {}, no score.' %s (%+.1f points)%s." % (
            "costs accuracy" if noise < photo else "does not cost accuracy", 100 * (noise - photo),
            ": its extra words carry meaning of their own that pulls every class embedding the same way"
            if noise < photo else ""))
    ensemble = [p for p in prompts if p["templates"].startswith("ensemble")]
    singles = [p["accuracy"] for p in prompts if not p["templates"].startswith("ensemble")]
    if ensemble and singles:
        wins = ensemble[0]["accuracy"] > max(singles)
        parts.append("The template ensemble %s the best single report template (%s vs %s)%s." % (
            "beats" if wins else "does not beat", fmt(ensemble[0]["accuracy"]), fmt(max(singles)),
            ": averaging embeddings over templates cancels the quirks of any one wording" if wins else ""))
    return " ".join(parts)


def p1_section(report: Report, results: dict, folder: str):
    report.heading("Problem 1: zero-shot image classification with CLIP")
    report.heading("1. Why CLIP classifies well without fine-tuning", 11)
    report.paragraph(CLIP_WHY)
    report.heading("2. Prompt templates", 11)
    prompts = results.get("p1_prompts") or []
    if prompts:
        report.table(["templates", "accuracy"], [[p["templates"], fmt(p["accuracy"])] for p in prompts])
        report.paragraph(prompt_analysis(prompts))
    report.paragraph("Accuracy over all classes: %s (prompt ensemble), %s (single prompt). Held-out colour-shape "
                     "combinations never seen in training captions: %s among the held-out classes, %s among all "
                     "classes." % (fmt(results.get("p1_accuracy")), fmt(results.get("p1_single_prompt_accuracy")),
                                    fmt(results.get("p1_heldout_accuracy")),
                                    fmt(results.get("p1_heldout_accuracy_all_classes"))))
    report.heading("3. Top-5 probabilities of three sampled images", 11)
    report.image(os.path.join(folder, results.get("files", {}).get("p1_top5", "p1/pred.top5.png")), height=0.35)


def p2_section(report: Report, results: dict, folder: str):
    report.heading("Problem 2: PEFT for image captioning")
    methods = results.get("p2") or {}
    if not methods:
        report.paragraph("No P2 results in %s." % folder)
        return
    best = results.get("p2_best") or max(methods, key=lambda m: methods[m].get("cider") or 0)
    b = methods[best]
    report.heading("1. Best setting", 11)
    report.paragraph("Best: %s, CIDEr %s, CLIPScore %s (object F1 %s) with %s trainable parameters. Settings: %s" % (
        best, fmt(b.get("cider")), fmt(b.get("clipscore")), fmt(b.get("object_f1")), b.get("trainable_params"),
        ", ".join("%s=%s" % kv for kv in sorted((b.get("settings") or {}).items()))))
    report.heading("2. Three PEFT attempts", 11)
    rows = [[m, fmt(v.get("cider")), fmt(v.get("clipscore")), fmt(v.get("object_f1")), fmt(v.get("exact_object_set")),
             "{:,}".format(v.get("trainable_params") or 0)] for m, v in sorted(methods.items())]
    report.table(["method", "CIDEr", "CLIPScore", "object F1", "exact set", "trainable params"], rows)
    decoding = results.get("p2_decoding") or []
    if decoding:
        report.heading("Decoding of the best attempt on val", 11)
        report.table(["method", "beam size", "length penalty", "CIDEr", "CLIPScore"],
                     [[d["method"], str(d["beam_size"]) if d["method"] == "beam" else "-",
                       fmt(d["length_penalty"], 1) if d["method"] == "beam" else "-", fmt(d.get("cider")),
                       fmt(d.get("clipscore"))] for d in decoding])
        chosen = results.get("p2_inference") or {}
        report.paragraph("Shipped with %s (%s)." % (", ".join("%s=%s" % (k, chosen[k]) for k in sorted(chosen)
                                                               if k != "chosen_on"), chosen.get("chosen_on")))
    curves = results.get("files", {}).get("p2_loss_curves")
    if curves:
        report.image(os.path.join(folder, curves), height=0.25, caption="Training loss of the p2_train.py runs.")


def p3_section(report: Report, results: dict, folder: str):
    report.heading("Problem 3: attention visualisation")
    files = results.get("files", {})
    index = os.path.join(folder, files.get("p3_index", "p3/index.md"))
    attention = os.path.join(os.path.dirname(index), "attention.json")
    report.heading("1. Attention maps of the test images (last cross-attention block, mean over heads)", 11)
    if os.path.isfile(attention):
        for entry in read_json(attention).get("figures", []):
            report.image(os.path.join(os.path.dirname(index), entry["figure"]), height=0.28,
                         caption="%s: %s" % (entry["image"], entry["caption"]))
    report.heading("2. Best and worst caption by CLIPScore", 11)
    best_worst = os.path.join(folder, files.get("p3_best_worst", "p3/best_worst/attention.json"))
    if os.path.isfile(best_worst):
        for entry in read_json(best_worst).get("figures", []):
            report.image(os.path.join(os.path.dirname(best_worst), entry["figure"]), height=0.28,
                         caption="%s (CLIPScore %s): %s" % (entry["image"], fmt(entry.get("score")), entry["caption"]))
    report.heading("3. Analysis", 11)
    pointing = results.get("pointing_game")
    report.paragraph(
        "Pointing game: for each shape word whose colour-shape pair names an object of the scene, the peak of its "
        "attention map falls inside that object's box in %s of the cases. The figures show what the other maps "
        "are for: an article or comma that opens the next phrase can already look at the object it is about to "
        "name (choosing 'an' over 'a' depends on that object's colour), while words with no visual content of "
        "their own ('on', 'background', the end token) spread their attention thinly." % fmt(pointing, 3))


def report_files(results_dir: str) -> List[str]:
    """Every file of a results folder that the report reads (relative paths), for a committed copy of the folder."""
    results = read_json(os.path.join(results_dir, "results.json"), "results file")
    files = ["results.json", "results.md"] + list((results.get("files") or {}).values())
    p2 = os.path.join(results_dir, "p2")
    if os.path.isdir(p2):  # each method's captions of the val split: the reference the committed checkpoints must give
        files += [os.path.join("p2", m, "pred.json") for m in sorted(os.listdir(p2))]
    for index in ("p3/attention.json", "p3/best_worst/attention.json"):
        if os.path.isfile(os.path.join(results_dir, index)):
            folder = os.path.dirname(index)
            files += [index, os.path.join(folder, "index.md")]
            files += [os.path.join(folder, e["figure"]) for e in read_json(os.path.join(results_dir, index))["figures"]
                      if e.get("figure")]
    return sorted(set(f for f in files if os.path.isfile(os.path.join(results_dir, f))))


def copy_results(results_dir: str, dest: str) -> str:
    """Replaces `dest` (empty or an earlier copy: it must hold results.json) with the files the report reads, so no
    figure of an earlier run is left behind."""
    import shutil

    with atomic_dir(dest, "results.json", "results") as tmp:
        for name in report_files(results_dir):
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            shutil.copyfile(os.path.join(results_dir, name), os.path.join(tmp, name))
    return dest


def build(results_dir: str, out: str, student_id=None) -> str:
    results = read_json(os.path.join(results_dir, "results.json"), "results file")
    if not isinstance(results, dict):
        raise UserError("%s/results.json must be a JSON object" % results_dir)
    report = Report()
    report.heading("DLCV HW3 report (hw3)", 16)
    report.paragraph("Source of every number and figure: %s (results folder %s). Each figure is reproduced by the "
                     "command named in the README." % (results.get("source", "unknown"), results_dir))
    p1_section(report, results, results_dir)
    report._new_page()
    p2_section(report, results, results_dir)
    report._new_page()
    p3_section(report, results, results_dir)
    report.save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join("outputs", "demo"), help="results folder (results.json ...)")
    parser.add_argument("--out", default="report.pdf", help="the PDF to write")
    parser.add_argument("--copy-to", metavar="DIR",
                        help="first copy the files the report reads into DIR (e.g. results/miniworld, to commit) "
                             "and build from there")
    args = parser.parse_args(argv)
    check_output_file(args.out, "report")
    results = copy_results(args.results, args.copy_to) if args.copy_to else args.results
    print("wrote %s" % build(results, args.out))
    return 0


if __name__ == "__main__":
    run_main(main)
