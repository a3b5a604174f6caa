"""Builds the homework's report from a results folder (run_all.py's, or the demo's): each report question of the
homework, numbered as the homework numbers it, answered from that folder's own numbers and figures.

A measure the results do not hold is not mentioned (the miniature world's held-out classes, object F1 and pointing
game appear only in the demo's report); a judgement only a person can make ("is the caption reasonable?") is said
to be one and asked in the results folder's answers.md, whose answers the report shows in their place.

Writes the PDF and report.md beside it (the same document: Markdown for GitHub, pandoc or an editor).

    python3 make_report.py --results outputs/hw3 --student-id r12345678     # writes hw3_r12345678.pdf, report.md
    python3 make_report.py --results outputs/demo --out report.pdf
    python3 make_report.py --results outputs/hw3 --check                    # the questions still unanswered
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from hw3.util.errors import UserError, run_main
from hw3.util.files import atomic_dir, atomic_write, check_output_file, read_json
from hw3.zeroshot.prompt_templates import REPORT_TEMPLATES
from hw3.report import answer_file
from hw3.report.layout import Report, say_undrawable

STUDENT_ID = re.compile(r"[A-Za-z0-9]+\Z")
UNKNOWN = "unknown"
MARKDOWN_NAME = "report.md"  # beside the PDF: the report's editable source

# The homework's report questions, in its numbering (P3 is problem 2's visualisation part).
QUESTIONS = dict(
    p1_methods="1. Methods analysis: why CLIP achieves competitive zero-shot performance",
    p1_prompts="2. Prompt-text analysis of the three templates",
    p1_top5="3. Quantitative analysis: top-5 similarity probabilities of three validation images",
    p2_best="1. Best setting and its CIDEr and CLIPScore on the validation data",
    p2_attempts="2. Three PEFT attempts and their CIDEr and CLIPScore",
    p3_test="1. Predicted captions and attention maps of the five test images",
    p3_best_worst="2. Top-1 and last-1 image-caption pairs by CLIPScore on the validation data",
    p3_analysis="3. Analysis: is the caption reasonable? Does the attended region reflect the word?",
)

# English function words (articles, prepositions, conjunctions, pronouns, auxiliaries, a few particles): the
# "function words" row of the attention table. Punctuation and the end token are rows of their own.
FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no another
of in on at by for with from to into onto over under above below near next beside behind between among through
across along around about against during before after up down out off than like as upon toward towards while
and or but nor so yet if because although though whether then
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs itself
themselves himself herself who whom whose which what there here
is are was were be been being am do does did has have had having will would shall should can could may might
must 's 're 't not
""".split())
CATEGORIES = ("content words", "function words", "punctuation", "end token")

CLIP_WHY = (
    "CLIP learns one embedding space for images and text from hundreds of millions of image-caption pairs with a "
    "contrastive loss: the caption of an image must be closer to it than every other caption in the batch. A class "
    "is therefore not an index into a fixed output layer, as in a VGG or ResNet classifier, but a sentence; any set "
    "of classes becomes a classifier by embedding one prompt per class and taking the most similar one. Because the "
    "captions cover open-ended concepts, styles and contexts, the image features are general, and the text encoder "
    "already knows the names of classes it never saw as labels. Prompt ensembling (averaging the class embedding "
    "over templates such as 'a photo of a {}.') reduces the mismatch between a bare class name and the captions "
    "CLIP was trained on.")


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else ("%.*f" % (digits, value) if isinstance(value, float) else str(value))


def setting(value) -> str:
    """A setting as a person writes it: floats short (0.0005, 5e-05, 16), lists without quotes."""
    if isinstance(value, float):
        return "%g" % value
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(setting(v) for v in value)
    return str(value)


def count(value) -> str:
    return UNKNOWN if value is None else "{:,}".format(value)


def settings_text(settings: Dict[str, object]) -> str:
    return ", ".join("%s=%s" % (k, setting(v)) for k, v in settings.items())


def say_cut(report: Report, rows: Dict[str, dict]):
    """The scored captions that hit the length limit without their end token, wherever there are any."""
    cut = [(name, row["cut"]) for name, row in rows.items() if isinstance(row, dict) and row.get("cut")]
    if cut:
        report.paragraph("Captions cut at the length limit (no end token), so scored shorter than decoded: %s." % (
            ", ".join("%s %s" % (name, setting(n)) for name, n in cut)))


def plain(value) -> str:
    """A results.json value in words: a dict as 'key value, ...', a list as '[a, b]', a number as setting()."""
    if isinstance(value, dict):
        return ", ".join("%s %s" % (k, plain(v)) for k, v in value.items())
    return setting(value)


# ----------------------------------------------------------------------------------------------- title page

def source_lines(results: dict) -> List[str]:
    """The source block: a dict written by run_all.py (missing keys: unknown), or an older results file's string."""
    source = results.get("source")
    if not isinstance(source, dict):
        return ["source: %s" % (source or UNKNOWN), "command: %s" % results.get("command", UNKNOWN)]
    versions = source.get("versions") if isinstance(source.get("versions"), dict) else {}
    gpu = source.get("gpu", UNKNOWN)
    lines = ["data: %s" % shown_path(source.get("data", UNKNOWN)), "command: %s" % shown_command(source.get("command", UNKNOWN)),
             "date: %s" % source.get("date", UNKNOWN),
             "device: %s, GPU: %s" % (source.get("device", UNKNOWN), "none" if gpu is None else gpu),
             "versions: " + ", ".join("%s %s" % (name, "not installed" if versions.get(name, UNKNOWN) is None
                                                 else versions.get(name, UNKNOWN))
                                      for name in ("python", "torch", "timm", "open_clip")),
             "git commit: %s" % (source.get("git_commit") or UNKNOWN)]
    if source.get("note"):
        lines.append("note: %s" % source["note"])
    return lines


def shown_path(path) -> str:
    """A path as the report may print it: relative as given, an absolute one by its last component only (the
    machine's folders are nobody else's business and would not resolve elsewhere)."""
    path = str(path)
    return ".../" + os.path.basename(path.rstrip("/\\")) if os.path.isabs(path) else path


def shown_command(command) -> str:
    """The command with each absolute path shown by shown_path (an option's '--x=/abs' too)."""
    return re.sub(r"(?<![^\s=])/[^\s'\"]+", lambda m: shown_path(m.group(0)), str(command))


def title_page(report: Report, results: dict, results_dir: str, student_id: Optional[str],
               report_dir: Optional[str] = None):
    report.heading("Captioning report (run_all.py --captions)" if toolkit_run(results) else "DLCV HW3 report", 1)
    if student_id:
        report.paragraph("Student ID: %s" % student_id)
    report.heading("Source of every number and figure", 3)
    for line in source_lines(results):
        report.paragraph(line, bullet=True)
    report.paragraph("Results folder: %s (results.json and the figures beside it)." % folder_name(results_dir,
                                                                                               report_dir))


def folder_name(results_dir: str, report_dir: Optional[str]) -> str:
    """The results folder as the report names it: from the report's own folder, so the report names no path of the
    machine it was written on and stays true when the folders move together."""
    if report_dir is None:
        return os.path.basename(os.path.abspath(results_dir)) if os.path.isabs(results_dir) else results_dir
    relative = os.path.relpath(os.path.abspath(results_dir), os.path.abspath(report_dir))
    return "this report's folder" if relative == os.curdir else relative


# ----------------------------------------------------------------------------------------------- toolkit run

def data_section(report: Report, data: dict):
    """run_all.py --captions: the data the run read, its caption lengths and what was cut."""
    report.new_page()
    report.heading("The data")
    for key, label in (("format", "caption file format"), ("splits", "split sizes"),
                       ("caption_tokens", "caption length in GPT-2 tokens"), ("cut", "captions cut")):
        if data.get(key) is not None:
            report.paragraph("%s: %s." % (label[0].upper() + label[1:], plain(data[key])), bullet=True)
    for key in sorted(set(data) - {"format", "splits", "caption_tokens", "cut"}):
        report.paragraph("%s: %s." % (key.replace("_", " "), plain(data[key])), bullet=True)


def attention_section(report: Report, results: dict, folder: str):
    """run_all.py --captions: the best attentive architecture's attention maps, its best and worst captions."""
    attention = results["attention"]
    report.heading("Attention maps of %s" % attention.get("arch", "the best attentive architecture"))
    for name in attention.get("figures") or []:
        report.image(os.path.join(folder, name), name, caption=os.path.splitext(os.path.basename(name))[0])
    for side in ("best", "worst"):
        entry = attention.get(side)
        if isinstance(entry, dict):
            rest = {k: v for k, v in entry.items() if k != "caption"}
            report.paragraph("%s caption: \"%s\" (%s)." % (side.capitalize(), entry.get("caption", UNKNOWN),
                                                            plain(rest)), bullet=True)


# ----------------------------------------------------------------------------------------------- P1

CONFIDENCE = 0.95  # of the paired intervals between templates


def binomial_cdf(k: int, m: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(m, p), summed in logs (m is a count of images, up to a few thousand)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= m else 0.0
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * math.log(p)
            + (m - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def clopper_pearson(k: int, m: int, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a binomial proportion k/m, by bisection on the binomial tails."""
    tail = (1 - confidence) / 2

    def solve(inside) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if inside(mid) else (low, mid)
        return (low + high) / 2
    lower = 0.0 if k == 0 else solve(lambda p: 1 - binomial_cdf(k - 1, m, p) < tail)
    upper = 1.0 if k == m else solve(lambda p: binomial_cdf(k, m, p) > tail)
    return lower, upper


def paired_interval(paired: dict) -> Tuple[float, float, float]:
    """(difference, lower, upper) in accuracy points of one template against another on the same images: exact
    McNemar, i.e. the Clopper-Pearson interval of the discordant images' split, scaled by their share."""
    gained, lost, n = paired["gained"], paired["lost"], paired["n"]
    discordant = gained + lost
    if not discordant:
        return 0.0, 0.0, 0.0
    lower, upper = clopper_pearson(gained, discordant)
    scale = 100.0 * discordant / n
    return 100.0 * (gained - lost) / n, scale * (2 * lower - 1), scale * (2 * upper - 1)


def noise_text(paired: Optional[dict]) -> Tuple[Optional[bool], str]:
    """(beyond sampling noise?, the interval in words); (None, "") without per-image results."""
    if not paired:
        return None, ""
    _, lower, upper = paired_interval(paired)
    beyond = lower > 0 or upper < 0
    return beyond, "%d%% interval %+.1f to %+.1f points, exact McNemar over the %d images%s" % (
        round(100 * CONFIDENCE), lower, upper, paired["n"],
        "" if beyond else ": within sampling noise, so the two are indistinguishable on this data")


def prompt_analysis(prompts: Sequence[dict]) -> str:
    """What the prompt table shows: a difference, its paired interval, and a cause only where the difference lies
    beyond sampling noise."""
    rows = {p["templates"]: p for p in prompts}
    photo, negated, noise = (rows.get(text) for _, text in REPORT_TEMPLATES)
    parts = []
    if photo and negated:
        gap = 100 * (negated["accuracy"] - photo["accuracy"])
        beyond, interval = noise_text(negated.get("paired"))
        parts.append("The negated prompt changes accuracy by %+.1f points against 'This is a photo of {}'%s%s." % (
            gap, " (%s)" % interval if interval else "", ": CLIP's text encoder, trained on captions that rarely negate, reads 'not a photo of X' "
                           "mostly as 'X'" if beyond and abs(gap) < 3 else ""))
    if photo and noise:
        worse = noise["accuracy"] < photo["accuracy"]
        beyond, interval = noise_text(noise.get("paired"))
        parts.append("'No {}, no score.' %s (%+.1f points%s)%s." % (
            "costs accuracy" if worse else "does not cost accuracy", 100 * (noise["accuracy"] - photo["accuracy"]),
            "; " + interval if interval else "", ": its extra words carry meaning of their own that pulls every class embedding the same way"
            if worse and beyond else ""))
    ensemble = [p for p in prompts if p["templates"].startswith("ensemble")]
    singles = [p["accuracy"] for p in prompts if not p["templates"].startswith("ensemble")]
    if ensemble and singles:
        wins = ensemble[0]["accuracy"] > max(singles)
        beyond, interval = noise_text(ensemble[0].get("paired"))
        parts.append("The template ensemble %s the best single report template (%s vs %s%s)%s." % (
            "beats" if wins else "does not beat", fmt(ensemble[0]["accuracy"]), fmt(max(singles)),
            "; " + interval if interval else "",
            ": averaging embeddings over templates cancels the quirks of any one wording" if wins and beyond else ""))
    if parts and not any(p.get("paired") for p in prompts):
        parts.append("The results hold no per-image predictions (an older run_all.py wrote them), so whether these "
                     "differences lie beyond sampling noise is not measured, and no cause is given.")
    return " ".join(parts)


def p1_section(report: Report, results: dict, folder: str):
    report.heading("Problem 1: zero-shot image classification with CLIP")
    if results.get("p1_model"):
        report.paragraph("CLIP model: %s." % results["p1_model"])
    report.heading(QUESTIONS["p1_methods"], 3)
    report.paragraph(CLIP_WHY)
    report.heading(QUESTIONS["p1_prompts"], 3)
    prompts = results.get("p1_prompts") or []
    if prompts:
        report.table(["templates", "accuracy on p1_data/val"], [[p["templates"], fmt(p["accuracy"])] for p in prompts],
                     widths=(0.7, 0.3))
        report.paragraph(prompt_analysis(prompts))
    else:
        report.paragraph("The results hold no prompt comparison (the p1 stage did not run).")
    overall = [(results.get(key), what) for key, what in (("p1_accuracy", "prompt ensemble"),
                                                          ("p1_single_prompt_accuracy", "single prompt"))]
    overall = ["%s (%s)" % (fmt(value), what) for value, what in overall if value is not None]
    if overall:
        report.paragraph("Accuracy over all validation images: %s." % ", ".join(overall))
    if results.get("p1_heldout_accuracy") is not None:  # miniature world only
        report.paragraph("Held-out colour-shape combinations never seen in training captions: %s among the held-out "
                         "classes, %s among all classes." % (fmt(results.get("p1_heldout_accuracy")),
                                                            fmt(results.get("p1_heldout_accuracy_all_classes"))))
    report.heading(QUESTIONS["p1_top5"], 3)
    report.image(os.path.join(folder, results.get("files", {}).get("p1_top5", "p1/pred.top5.png")),
                 results.get("files", {}).get("p1_top5", "p1/pred.top5.png"), caption="Three validation images, each with the probabilities of its five most similar classes "
                         "(p1_clip_zeroshot.py --plot-top5 3).")


# ----------------------------------------------------------------------------------------------- P2

def active_decoding(inference: dict) -> Dict[str, object]:
    """The shipped decoding without the settings its method ignores (greedy has no beam width or length penalty)."""
    inactive = () if inference.get("method") == "beam" else ("beam_size", "length_penalty")
    return {k: v for k, v in inference.items() if k != "chosen_on" and k not in inactive}


def training_text(row: dict) -> str:
    training = row.get("training")
    if not training:
        return "training settings not recorded in results.json"
    names = (("lr", "learning rate"), ("epochs", "epochs"), ("batch_size", "batch size"))
    return ", ".join("%s %s" % (label, setting(training.get(key, UNKNOWN))) for key, label in names)


def peft_text(row: dict) -> str:
    return settings_text(row["peft"]) if row.get("peft") else "PEFT settings not recorded in results.json"


def world_columns(methods: Dict[str, dict]) -> List[Tuple[str, str]]:
    """Object F1 and exact set, when every row holds them (the miniature world's captions name known objects)."""
    return [(key, label) for key, label in (("object_f1", "object F1"), ("exact_object_set", "exact set"))
            if all(row.get(key) is not None for row in methods.values())]


def p2_section(report: Report, results: dict, folder: str):
    report.heading("Problem 2: PEFT for image captioning (evaluation metrics)")
    methods = results.get("p2") or {}
    if not methods:
        report.paragraph("The results hold no P2 scores (the p2 stage did not run).")
        return
    best = results.get("p2_best") or max(methods, key=lambda m: methods[m].get("cider") or 0)
    row = methods[best]
    report.heading(QUESTIONS["p2_best"], 3)
    world = "".join(", %s %s" % (label, fmt(row[key])) for key, label in world_columns({best: row}))
    report.paragraph("The best attempt by CIDEr on the validation split is %s: CIDEr %s, CLIPScore %s%s, with %s "
                     "trainable parameters." % (best, fmt(row.get("cider")), fmt(row.get("clipscore")), world,
                                                count(row.get("trainable_params"))))
    if row.get("encoder"):
        report.paragraph("Image encoder: %s." % row["encoder"], bullet=True)
    report.paragraph("PEFT, %s: %s." % (best, peft_text(row)), bullet=True)
    report.paragraph("Training: %s." % training_text(row), bullet=True)
    inference = results.get("p2_inference") or {}
    if inference:
        report.paragraph("Decoding, shipped with the checkpoint (p2_best.json): %s; chosen by %s." % (
            settings_text(active_decoding(inference)), inference.get("chosen_on", UNKNOWN)), bullet=True)
    else:
        report.paragraph("Decoding: not recorded (the decoding stage did not run).", bullet=True)
    report.heading(QUESTIONS["p2_attempts"], 3)
    extra = world_columns(methods)
    report.table(["method", "CIDEr", "CLIPScore"] + [label for _, label in extra] + ["trainable params"],
                 [[m + (" (best)" if m == best else ""), fmt(v.get("cider")), fmt(v.get("clipscore"))]
                  + [fmt(v[key]) for key, _ in extra] + [count(v.get("trainable_params"))]
                  for m, v in sorted(methods.items())])
    say_cut(report, methods)
    for method, v in sorted(methods.items()):
        report.paragraph("%s: %s; %s." % (method, peft_text(v), training_text(v)), bullet=True)
    decoding = results.get("p2_decoding") or []
    if decoding:
        report.heading("Decoding of the best attempt on the validation data", 3)
        report.table(["method", "beam size", "length penalty", "CIDEr", "CLIPScore"],
                     [[d["method"], str(d["beam_size"]) if d["method"] == "beam" else "-",
                       fmt(d["length_penalty"], 1) if d["method"] == "beam" else "-", fmt(d.get("cider")),
                       fmt(d.get("clipscore"))] for d in decoding])
    curves = results.get("files", {}).get("p2_loss_curves")
    if curves:
        report.image(os.path.join(folder, curves), curves, caption="Training loss of the p2_train.py runs.")


# ----------------------------------------------------------------------------------------------- compare

# Seed 004's DeepFashion-MultiModal captioners, the table our comparison is set beside (issue 20).
# Seed 004 by its public name: another course's project report (written in Chinese; the title translated).
SEED_REPORT = ("the course project report 'Neural Networks and Deep Learning Course Design: Final Report' (Zhao, "
               "Wang and Zhang; image captioning on DeepFashion-MultiModal)")
COMPARE_SEED_CITATION = SEED_REPORT
COMPARE_SEED_TABLE = (("ResNet-101 global + GRU", "gru", 1.235),
                      ("ResNet-101 grid + attention GRU", "attention-gru", 1.275),
                      ("ViT-B/16 + Transformer decoder", "transformer", 1.618))
COMPARE_COLUMNS = (("CIDEr", "CIDEr"), ("BLEU-4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE-L"),
                   ("CLIPScore", "CLIPScore"), ("object_f1", "object F1"), ("exact_object_set", "exact set"),
                   ("pointing_game", "pointing"))


def ranking(rows: Dict[str, dict], names: Sequence[str]) -> str:
    """'gru < attention-gru < transformer' by CIDEr, over the names that have a score."""
    scored = sorted((n for n in names if (rows.get(n) or {}).get("CIDEr") is not None), key=lambda n: rows[n]["CIDEr"])
    return " < ".join(scored)


def compare_section(report: Report, results: dict):
    """The classic architectures beside the PEFT GPT-2 (run_all.py --with compare), with the seed's table."""
    rows = results.get("compare") or {}
    report.heading("Architecture comparison: classic captioners beside the PEFT GPT-2")
    report.paragraph("Each architecture was trained on the same data and image features (the frozen encoder's "
                     "tokens, one feature cache) and its validation captions decoded with the README default and "
                     "scored with the same metrics (run_all.py, the compare stage).%s" % (
                         " gpt2 is P2's best PEFT attempt." if "gpt2" in rows else ""))
    columns = [(key, label) for key, label in COMPARE_COLUMNS if any(r.get(key) is not None for r in rows.values())]
    counts = [(key, label, show) for key, label, show in (("trainable_params", "trained params", count),
                                                          ("train_seconds", "train s", lambda v: fmt(v, 0)))
              if any(r.get(key) is not None for r in rows.values())]
    share = (0.82 - 0.12 * len(counts)) / max(1, len(columns))  # the scores share what the name and counts leave
    report.table(["architecture"] + [label for _, label in columns] + [label for _, label, _ in counts],
                 [[arch + (" (%s)" % r["peft"] if r.get("peft") else "")] + [fmt(r.get(key), 3) for key, _ in columns]
                  + [show(r.get(key)) for key, _, show in counts] for arch, r in rows.items()],
                 widths=[0.18] + [share] * len(columns) + [0.12] * len(counts))
    say_cut(report, rows)
    missing = [label for key, label in COMPARE_COLUMNS[:5] if all(r.get(key) is None for r in rows.values())]
    if missing:
        report.paragraph("Not measured here: %s (METEOR needs Java)." % ", ".join(missing))
    report.heading("Beside the seed's DeepFashion table", 3)
    report.table(["seed 004: model", "CIDEr (DeepFashion)", "ours: architecture", "CIDEr (these data)"],
                 [[model, "%.3f" % cider, arch, fmt((rows.get(arch) or {}).get("CIDEr"), 3)]
                  for model, arch, cider in COMPARE_SEED_TABLE], widths=(0.36, 0.2, 0.24, 0.2))
    ours = ranking(rows, [arch for _, arch, _ in COMPARE_SEED_TABLE])
    seed = " < ".join(arch for _, arch, _ in sorted(COMPARE_SEED_TABLE, key=lambda s: s[2]))
    report.paragraph("Source of the left half: %s, CIDEr as the seed reports it. The ranking by CIDEr there is %s; "
                     "here it is %s%s. The datasets, encoders and training budgets differ, so only the ranking is "
                     "comparable, not the numbers." % (COMPARE_SEED_CITATION, seed, ours or "not measured",
                                          "" if ours == seed else " (it differs)"))
    ablation = results.get("ablation") or {}
    if ablation:
        report.heading("Ablation: the doubly stochastic attention term of attention-gru", 3)
        report.table(["run", "--attention-reg", "CIDEr", "pointing game"],
                     [[name, setting(a.get("attention_reg")), fmt(a.get("CIDEr"), 3), fmt(a.get("pointing_game"), 3)]
                      for name, a in ablation.items()])
        report.paragraph("attention-gru trained with Show-Attend-Tell's term (1 - sum over steps of each patch's "
                         "attention)^2 at weight 1, against the same run at 0. The term pushes every patch to be "
                         "attended about once over the caption.%s" % (
                             " The pointing game (miniature world only) asks whether each shape word's attention peak "
                             "lies on its object." if any(a.get("pointing_game") is not None
                                                          for a in ablation.values()) else ""))


# ----------------------------------------------------------------------------------------------- P3

def word_category(word: Optional[str]) -> str:
    if word is None:
        return "end token"
    word = word.strip().lower()
    if not any(c.isalnum() for c in word):
        return "punctuation"
    return "function words" if word in FUNCTION_WORDS else "content words"


def category_name(category: str) -> str:
    return "the end token" if category == "end token" else category


def category_table(entries: Sequence[dict]) -> List[Tuple[str, int, float, float]]:
    """(category, tokens, mean top-10% share, mean normalised entropy) over every token of the entries."""
    pooled: Dict[str, List[dict]] = {c: [] for c in CATEGORIES}
    for entry in entries:
        for token in entry.get("tokens") or []:
            pooled[word_category(token.get("word"))].append(token)
    return [(c, len(ts), sum(t["top10_share"] for t in ts) / len(ts), sum(t["entropy"] for t in ts) / len(ts))
            for c, ts in pooled.items() if ts]


def compare(name_a: str, a: Tuple, name_b: str, b: Tuple, tolerance: float = 0.01) -> str:
    """Which of two categories' attention is more concentrated, by both measures, or that they disagree."""
    share, entropy = a[2] - b[2], b[3] - a[3]  # positive: a more concentrated
    if abs(share) < tolerance and abs(entropy) < tolerance:
        return "%s and %s are about equally concentrated (differences below %g)" % (name_a, name_b, tolerance)
    if share > 0 and entropy > 0:
        return "%s are more concentrated than %s by both measures" % (name_a, name_b)
    if share < 0 and entropy < 0:
        return "%s are less concentrated than %s by both measures" % (name_a, name_b)
    return "the two measures disagree on whether %s are more concentrated than %s" % (name_a, name_b)


def concentration_paragraph(entries: Sequence[dict], table) -> str:
    rows = {row[0]: row for row in table}
    tokens = [(t, e["image"]) for e in entries for t in e.get("tokens") or []]
    parts = ["Over %d generated tokens of %d captions, the mean share of attention on the top 10%% of patches (a "
             "uniform map gives about 0.1, one patch 1) is %s; the mean normalised entropy (1 uniform, 0 one patch) is "
             "%s." % (len(tokens), len(entries), ", ".join("%.3f for %s" % (r[2], category_name(r[0])) for r in table),
                      ", ".join("%.3f for %s" % (r[3], category_name(r[0])) for r in table))]
    if "content words" in rows and "function words" in rows:
        parts.append("So %s." % compare("content words", rows["content words"], "function words",
                                        rows["function words"]))
    peak = max(tokens, key=lambda ti: ti[0]["top10_share"])
    flat = min(tokens, key=lambda ti: ti[0]["top10_share"])
    parts.append("The most concentrated token is '%s' in %s (share %.3f, entropy %.3f); the least, '%s' in %s "
                 "(share %.3f, entropy %.3f)." % (peak[0]["label"], peak[1], peak[0]["top10_share"],
                                                   peak[0]["entropy"], flat[0]["label"], flat[1],
                                                   flat[0]["top10_share"], flat[0]["entropy"]))
    parts.append("These measures say how peaked a map is, not whether its peak lies on the object the word names; "
                 "that needs a person looking at the figures above.")
    return " ".join(parts)


def attention_kind(layer: str, heads: str) -> str:
    """p3_visualize's --layer and --heads in words."""
    blocks = dict(last="the last decoder block with cross-attention", mean="the mean over the blocks with "
                  "cross-attention").get(layer, "decoder block %s" % layer)
    return "%s, %s" % (blocks, dict(mean="mean over heads", max="maximum over heads").get(heads, "head %s" % heads))


def attention_entries(folder: str, files: dict) -> Tuple[List[dict], List[dict], str, str, dict]:
    index = os.path.join(folder, files.get("p3_index", "p3/index.md"))
    test_json = os.path.join(os.path.dirname(index), "attention.json")
    pair_json = os.path.join(folder, files.get("p3_best_worst", "p3/best_worst/attention.json"))
    test = read_json(test_json, "P3 attention file") if os.path.isfile(test_json) else {}
    pair = read_json(pair_json, "P3 attention file") if os.path.isfile(pair_json) else {}
    return (test.get("figures") or [], pair.get("figures") or [], os.path.dirname(test_json),
            os.path.dirname(pair_json), test)


def p3_section(report: Report, results: dict, folder: str, answers: Dict[str, str]):
    report.heading("Problem 2: visualisation of attention in image captioning (P3)")
    test, pair, test_dir, pair_dir, meta = attention_entries(folder, results.get("files", {}))
    report.heading(QUESTIONS["p3_test"], 3)
    report.paragraph("Cross-attention of each generated token over the image patches (%s; the start-token panel "
                     "shows the image)." % attention_kind(meta.get("layer", "last"), meta.get("heads", "mean")))
    if not test:
        report.paragraph("The results hold no P3 figures (the p3 stage did not run).")
    for entry in test:
        report.image(os.path.join(test_dir, entry["figure"]), shown(folder, test_dir, entry["figure"]),
                     caption="%s: %s" % (entry["image"], entry["caption"]))
    report.heading(QUESTIONS["p3_best_worst"], 3)
    if not pair:
        report.paragraph("The results hold no top-1/last-1 figures (the p3 stage did not run).")
    for rank, entry in zip(("top-1", "last-1"), pair):
        report.image(os.path.join(pair_dir, entry["figure"]), shown(folder, pair_dir, entry["figure"]),
                     caption="%s: %s, CLIPScore %s: %s" % (rank, entry["image"], fmt(entry.get("score")),
                                                          entry["caption"]))
    report.heading(QUESTIONS["p3_analysis"], 3)
    entries = test + pair
    table = category_table(entries)
    if table:
        report.paragraph("How concentrated each token's attention map is, measured without labels: the share of the "
                         "map on its top 10% of patches, and its entropy over log(number of patches).")
        report.table(["tokens of", "count", "mean top-10% share", "mean normalised entropy"],
                     [[c, str(n), "%.3f" % share, "%.3f" % entropy] for c, n, share, entropy in table])
        report.paragraph(concentration_paragraph(entries, table))
    elif entries:
        report.paragraph("attention.json holds no per-token measures (written by an older p3_visualize.py); rerun "
                         "the p3 stage (run_all.py --force p3) to measure them.")
    if results.get("pointing_game") is not None:  # miniature world only
        report.paragraph("Pointing game (miniature world, where every object's box is known): for each shape word "
                         "whose colour-shape pair names an object of the scene, the peak of its attention map falls "
                         "inside that object's box in %s of %s cases." % (fmt(results["pointing_game"], 3),
                                                                          results.get("pointing_trials", UNKNOWN)))
    report.paragraph("Whether a caption is reasonable, and whether each attended region reflects its word, is a "
                     "judgement for a person looking at the figures above; this report does not make it. Your answer, "
                     "per caption, from %s in the results folder:" % answer_file.ANSWERS_FILE)
    for question in p3_questions(entries):
        report.question(question.qid, question.text, question.hint, answers.get(question.qid, ""),
                        answer_file.ANSWERS_FILE)


def p3_questions(entries: Sequence[dict]) -> List[answer_file.Question]:
    """One question per caption shown, with what the numbers say (its most concentrated content tokens)."""
    questions: Dict[str, answer_file.Question] = {}
    for entry in entries:
        words = sorted((t for t in entry.get("tokens") or [] if word_category(t.get("word")) == "content words"),
                       key=lambda t: -t["top10_share"])[:3]
        hint = "Most concentrated content tokens (top-10%% share): %s." % ", ".join(
            "'%s' %.2f" % (t["label"], t["top10_share"]) for t in words) if words else ""
        qid = "P3.3 %s" % entry["image"]
        questions.setdefault(qid, answer_file.Question(qid, "\"%s\": is the caption reasonable, and does each "
                                                          "attended region reflect its word?" % entry["caption"],
                                                          hint))
    return list(questions.values())


def shown(folder: str, figure_dir: str, name: str) -> str:
    """A figure's path relative to the results folder, as the report names it."""
    return os.path.relpath(os.path.join(figure_dir, name), folder)


# ----------------------------------------------------------------------------------------------- files

def report_files(results_dir: str) -> List[str]:
    """Every file of a results folder that the report reads (relative paths), for a committed copy of the folder."""
    results = read_json(os.path.join(results_dir, "results.json"), "results file")
    files = ["results.json", "results.md", answer_file.ANSWERS_FILE] + list((results.get("files") or {}).values())
    if isinstance(results.get("attention"), dict):
        files += list(results["attention"].get("figures") or [])
    p2 = os.path.join(results_dir, "p2")
    if os.path.isdir(p2):  # each method's captions of the val split: the reference the committed checkpoints must give
        files += [os.path.join("p2", m, "pred.json") for m in sorted(os.listdir(p2))]
    if isinstance(results.get("scst"), dict) and results["scst"].get("method"):  # the self-critical captions too
        files.append(os.path.join("scst", results["scst"]["method"], "pred.json"))
    for index in ("p3/attention.json", "p3/best_worst/attention.json"):
        if os.path.isfile(os.path.join(results_dir, index)):
            folder = os.path.dirname(index)
            files += [index, os.path.join(folder, "index.md")]
            files += [os.path.join(folder, e["figure"]) for e in read_json(os.path.join(results_dir, index))["figures"]
                      if e.get("figure")]
    return sorted(set(f for f in files if os.path.isfile(os.path.join(results_dir, f))))


def copy_results(results_dir: str, dest: str) -> str:
    """Replaces `dest` (empty or an earlier copy: it must hold results.json) with the files the report reads, so no
    figure of an earlier run is left behind; answers already written in `dest` are kept when the source has none."""
    import shutil

    kept = os.path.join(dest, answer_file.ANSWERS_FILE)
    with atomic_dir(dest, "results.json", "results") as tmp:
        names = report_files(results_dir)
        for name in names:
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            shutil.copyfile(os.path.join(results_dir, name), os.path.join(tmp, name))
        if answer_file.ANSWERS_FILE not in names and os.path.isfile(kept):
            shutil.copyfile(kept, os.path.join(tmp, answer_file.ANSWERS_FILE))
    return dest


def check_student_id(student_id: Optional[str]) -> Optional[str]:
    if student_id is not None and not STUDENT_ID.match(student_id):
        raise UserError("--student-id %r: letters and digits only, as in r12345678" % student_id)
    return student_id


# ----------------------------------------------------------------------------------------------- scst

SCST_COLUMNS = (("CIDEr", "CIDEr"), ("CLIPScore", "CLIPScore"), ("BLEU-4", "BLEU-4"), ("object_f1", "object F1"),
                ("exact_object_set", "exact set"))
SCST_SETTINGS = (("scst_epochs", "epochs"), ("scst_samples", "samples per image"), ("scst_baseline", "baseline"),
                 ("scst_lr", "learning rate"), ("scst_temperature", "temperature"), ("scst_end_word", "end word"),
                 ("scst_clip_weight", "CLIP weight"), ("best_epoch", "best epoch"))


def ratio(before, after) -> str:
    return "%.3fx" % (after / before) if before and after is not None else UNKNOWN


def percent_change(before, after) -> str:
    return "%+.1f %%" % (100.0 * (after - before) / before) if before and after is not None else UNKNOWN


def scst_section(report: Report, results: dict):
    """Only when the scst stage ran (run_all --with scst): before and after, and captions that changed."""
    scst = results["scst"]
    before, after, s = scst.get("before") or {}, scst.get("after") or {}, scst.get("settings") or {}
    report.heading("Self-critical fine-tuning (CIDEr-optimised)")
    method = scst.get("method", UNKNOWN)
    report.paragraph("The %s attempt (%s) was fine-tuned by self-critical sequence training (Rennie et al. "
                     "2017): each training image's sampled captions are rewarded by CIDEr-D against its references, "
                     "less a baseline, and only the trained parameters move (%s). Both checkpoints are scored on the "
                     "validation split with the shipped decoding (%s)." % (
                         method, "P2's best" if method == results.get("p2_best") else "chosen by --scst-method",
                         ", ".join("%s %s" % (label, setting(s[k])) for k, label in SCST_SETTINGS if k in s),
                         settings_text(active_decoding(s.get("decoding") or {}))))
    columns = [(k, label) for k, label in SCST_COLUMNS if before.get(k) is not None or after.get(k) is not None]
    report.table(["checkpoint"] + [label for _, label in columns],
                 [[side] + [fmt(row.get(k), 3) for k, _ in columns] for side, row in (("before", before),
                                                                                      ("after", after))])
    say_cut(report, dict(before=before, after=after))
    report.paragraph("CIDEr after / before: %s; CLIPScore: %s." % (
        ratio(before.get("CIDEr"), after.get("CIDEr")), percent_change(before.get("CLIPScore"), after.get("CLIPScore"))))
    changed = scst.get("changed") or []
    if changed:
        report.heading("Captions that changed (most improved, then most worsened, by CIDEr)", 3)
        for c in changed:
            marks = ""
            if "objects_right_before" in c:
                marks = "; objects %s -> %s" % tuple("right" if c[k] else "wrong"
                                                     for k in ("objects_right_before", "objects_right_after"))
            report.paragraph("%s: \"%s\" -> \"%s\" (CIDEr %.3f -> %.3f%s)" % (
                c["image"], c["before"], c["after"], c["cider_before"], c["cider_after"], marks), bullet=True)


# ----------------------------------------------------------------------------------------------- distill

# Seed 004 section 5.2: small captioners trained on a LoRA-tuned LLaVA-13B's captions of DeepFashion-MultiModal
# (section 4.2.3: "precise", and "creative" sampled at temperature 0.9), scored on the real references.
SEED_DISTILL = (("precise", dict(CIDEr=1.90, BLEU=0.653, METEOR=0.624, ROUGE=0.654)),
                ("creative (sampled at 0.9)", dict(CIDEr=0.259, BLEU=0.339, METEOR=0.247, ROUGE=0.293)))
SEED_CITATION = ("%s, sections 4.2.3 and 5.2: students trained on LLaVA-13B captions of DeepFashion-MultiModal; its "
                 "BLEU column does not say which n" % SEED_REPORT)


def teacher_name(teacher: dict) -> str:
    """P2's best captioner, or without the GPT-2 the architecture run_all chose and why."""
    arch = teacher.get("arch", "gpt2")
    return "the best P2 captioner" if arch == "gpt2" else "the %s captioner, %s" % (
        arch, teacher.get("chosen_on") or "the run's best")


def distill_section(report: Report, results: dict):
    """Only when the distill stage ran (run_all --with distill)."""
    rows = results.get("distill") or {}
    report.heading("Learning from a teacher's captions: precise against creative")
    teacher = rows.get("teacher") or {}
    decoding = teacher.get("decoding") or {}
    report.paragraph("The teacher is %s. It captions the training images twice: precise, with its "
                     "shipped decoding (%s), and creative, sampled (%s). A %s student is trained three times with "
                     "identical settings, on the human captions and on each teacher caption set; every row is scored "
                     "on the validation split's human references." % (
                         teacher_name(teacher), settings_text(active_decoding(decoding.get("precise") or {})),
                         settings_text(active_decoding(decoding.get("creative") or {})),
                         (rows.get("human") or {}).get("arch", UNKNOWN)))
    keys = [k for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "CLIPScore", "object_f1", "captions_per_image")
            if any(row.get(k) is not None for row in rows.values())]  # object F1: the miniature world's only
    labels = dict(object_f1="object F1", captions_per_image="captions/image")

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        return "%g" % value if key == "captions_per_image" and value is not None else fmt(value, 3)
    report.table(["trained on"] + [labels.get(k, k) for k in keys],
                 [["the teacher itself" if name == "teacher" else name] + [cell(row, k) for k in keys]
                  for name, row in rows.items()], widths=[0.19] + [0.66 / (len(keys) - 1)] * (len(keys) - 1) + [0.15])
    say_cut(report, rows)
    report.heading("The seed's table beside it", 3)
    report.table(["trained on", "CIDEr", "BLEU", "METEOR", "ROUGE-L"],
                 [[name] + [fmt(v[k], 3) for k in ("CIDEr", "BLEU", "METEOR", "ROUGE")] for name, v in SEED_DISTILL],
                 widths=(0.32, 0.17, 0.17, 0.17, 0.17))
    report.paragraph("Source: %s." % SEED_CITATION)


def read_results(results_dir: str) -> dict:
    results = read_json(os.path.join(results_dir, "results.json"), "results file")
    if not isinstance(results, dict):
        raise UserError("%s/results.json must be a JSON object" % results_dir)
    return results


def toolkit_run(results: dict) -> bool:
    """A run_all.py --captions run on another dataset: the homework's P1 and P3 are left out unless they ran."""
    source = results.get("source") if isinstance(results.get("source"), dict) else {}
    return isinstance(results.get("data"), dict) or "--captions" in str(source.get("command") or results.get("command"))


def questions(results_dir: str) -> List[answer_file.Question]:
    """The questions only a person can answer, for this results folder (one per P3 caption)."""
    test, pair = attention_entries(results_dir, read_results(results_dir).get("files", {}))[:2]
    return p3_questions(test + pair)


def compose(results_dir: str, student_id: Optional[str] = None, answers: Optional[Dict[str, str]] = None,
            report_dir: Optional[str] = None) -> Report:
    """The report's blocks, not yet written; `answers` (default: answers.md's) fill the questions; `report_dir`, the
    folder the report is written to (the results folder is named from there)."""
    check_student_id(student_id)
    results = read_results(results_dir)
    answers = answer_file.read(results_dir) if answers is None else answers
    toolkit = toolkit_run(results)
    report = Report()
    title_page(report, results, results_dir, student_id, report_dir)
    if isinstance(results.get("data"), dict):
        data_section(report, results["data"])
    sections = [(not toolkit or has_p1(results), lambda: p1_section(report, results, results_dir)),
                (not toolkit or bool(results.get("p2")), lambda: p2_section(report, results, results_dir)),
                (not toolkit or any(attention_entries(results_dir, results.get("files", {}))[:2]),
                 lambda: p3_section(report, results, results_dir, answers)),
                (bool(results.get("distill")), lambda: distill_section(report, results)),
                (bool(results.get("compare")), lambda: compare_section(report, results)),  # --with compare
                (isinstance(results.get("attention"), dict), lambda: attention_section(report, results, results_dir)),
                (bool(results.get("scst")), lambda: scst_section(report, results))]  # --with scst
    for wanted, section in sections:
        if wanted:
            report.new_page()
            section()
    return report


def has_p1(results: dict) -> bool:
    return any(results.get(k) is not None for k in ("p1_prompts", "p1_accuracy", "p1_model"))


def build(results_dir: str, out: str, student_id: Optional[str] = None, text_out: Optional[str] = None) -> str:
    """Writes the PDF to `out`, report.md beside it, answers.md into the results folder if absent (never over it),
    and the report's text, a line per item, to `text_out`; returns `out`."""
    check_student_id(student_id)
    answers = answer_file.ensure(results_dir, questions(results_dir))
    report = compose(results_dir, student_id, answers, os.path.dirname(os.path.abspath(out)))
    markdown_path = os.path.join(os.path.dirname(os.path.abspath(out)), MARKDOWN_NAME)
    markdown = report.markdown(os.path.dirname(markdown_path))
    say_undrawable(report.save(out))
    with atomic_write(markdown_path) as f:
        f.write(markdown)
    if text_out:
        with atomic_write(text_out) as f:
            f.write("\n".join(report.lines) + "\n")
    return out


def check(results_dir: str) -> int:
    """--check: the questions still unanswered in answers.md, one a line; 1 while any remain."""
    asked = questions(results_dir)
    left = answer_file.unanswered(results_dir, asked)
    path = os.path.join(results_dir, answer_file.ANSWERS_FILE)
    if not left:
        print("all %d question(s) answered in %s" % (len(asked), path))
        return 0
    print("%d of %d question(s) unanswered in %s:" % (len(left), len(asked), path))
    for question in left:
        print("  [%s] %s" % (question.qid, question.text))
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join("outputs", "demo"), help="results folder (results.json ...)")
    parser.add_argument("--student-id", help="your student ID (letters and digits): on the title page, and the PDF "
                        "is named hw3_<ID>.pdf as the course asks unless --out is given")
    parser.add_argument("--out", help="the PDF to write (default: hw3_<ID>.pdf with --student-id, else report.pdf)")
    parser.add_argument("--text", metavar="FILE", help="also write the report's text, one item a line")
    parser.add_argument("--check", action="store_true", help="only list the questions not yet answered in the "
                        "results folder's %s; exit status 1 while any remain" % answer_file.ANSWERS_FILE)
    parser.add_argument("--copy-to", metavar="DIR",
                        help="first copy the files the report reads into DIR (e.g. results/miniworld, to commit) "
                             "and build from there")
    args = parser.parse_args(argv)
    check_student_id(args.student_id)
    if args.check:
        return check(args.results)
    out = args.out or ("hw3_%s.pdf" % args.student_id if args.student_id else "report.pdf")
    check_output_file(out, "report")
    if args.text:
        check_output_file(args.text, "report text")
    results = copy_results(args.results, args.copy_to) if args.copy_to else args.results
    print("wrote %s" % build(results, out, args.student_id, args.text))
    return 0


if __name__ == "__main__":
    run_main(main)
