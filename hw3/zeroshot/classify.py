"""P1: zero-shot classification with a pretrained CLIP, no fine-tuning.

Class embeddings are averaged over a template set (normalised before and after averaging, as open_clip's
zero_shot_classifier does); each image goes to the class whose embedding is most similar to its own.
The CLIP comes from open_clip when it is installed, else from OpenAI's clip package (the course's environment).
One run loads the CLIP once and encodes the images once; --compare-prompts classifies those same image embeddings with
the report's templates too, each template set's class embeddings built once.

    python3 p1_clip_zeroshot.py IMG_DIR ID2LABEL_JSON OUT_CSV [--evaluate] [--compare-prompts] [--plot-top5 3]
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from hw3.models import clip_backend
from hw3.zeroshot import prompt_templates
from hw3.data.images import ImageFiles, collate_images, image_batches, list_images, load_rgb
from hw3.util.device import autocast, resolve_device
from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import atomic_write, check_output_file, read_json, write_json

DEFAULT_TEMPLATES = "cifar"
CLASSES_PER_TEXT_BATCH = 10
TOP_K = 5
# --compare-prompts: the report's three single templates, and CLIP's single prompt the ensemble is measured against.
COMPARED_SETS = tuple(key for key, _ in prompt_templates.REPORT_TEMPLATES) + ("single",)


def read_id2label(path: str) -> List[str]:
    """Class names indexed by their integer id; ids must be 0..N-1 with no gaps."""
    mapping = read_json(path, "id2label file")
    if not isinstance(mapping, dict) or not mapping:
        raise UserError("id2label file %s must be a non-empty JSON object {\"0\": \"name\", ...}" % path)
    by_id: Dict[int, str] = {}
    for key, name in mapping.items():
        if not re.fullmatch(r"\s*\d+\s*", str(key)):
            raise UserError("id2label file %s: key %r is not a non-negative integer id" % (path, key))
        if not isinstance(name, str) or not clean_class_name(name):
            raise UserError("id2label file %s: the name of id %s is %r, not a non-empty string" % (path, key, name))
        if int(key) in by_id:
            raise UserError("id2label file %s: id %d appears twice" % (path, int(key)))
        by_id[int(key)] = name
    gaps = sorted(set(range(len(by_id))) - set(by_id))
    if gaps:
        raise UserError("id2label file %s: ids must run 0..%d without gaps; missing %s"
                        % (path, len(by_id) - 1, ", ".join(str(g) for g in gaps[:10])))
    first: Dict[str, int] = {}
    for i in range(len(by_id)):  # two ids of one name (after cleaning) would split its votes: refused
        name = clean_class_name(by_id[i]).lower()
        if name in first:
            raise UserError("id2label file %s: ids %d and %d share the class name %r"
                            % (path, first[name], i, clean_class_name(by_id[i])))
        first[name] = i
    return [by_id[i] for i in range(len(by_id))]


def clean_class_name(name: str) -> str:
    """`aquarium_fish` -> `aquarium fish`: prompts should read like captions."""
    return " ".join(name.replace("_", " ").split())


def load_templates(spec: str) -> List[prompt_templates.Template]:
    """A named set (prompt_templates) or a file with one template per line; `{}` or `{object}` marks the class name."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            lines = [(number, line.strip()) for number, line in enumerate(f, 1)]
        templates = []
        for number, line in lines:
            if not line or line.startswith("#"):
                continue
            line = line.replace("{object}", "{}")
            if line.count("{}") != 1 or line.replace("{}", "").count("{") or line.replace("{}", "").count("}"):
                raise UserError("templates file %s line %d: %r needs exactly one {} (or {object}) for the class name "
                                "and no other braces" % (spec, number, line))
            templates.append(line)
        if not templates:
            raise UserError("templates file %s has no templates (one per line, with {} for the class name)" % spec)
        return templates
    try:
        return list(prompt_templates.template_set(spec))
    except KeyError:
        raise UserError("--templates %r is neither a file nor a named set (%s)"
                        % (spec, ", ".join(prompt_templates.set_names()))) from None


def labels_from_names(names: Sequence[str], num_classes: int, what: str) -> List[int]:
    """True labels from the `{label}_{id}.png` file-name convention of the course's validation set."""
    labels = []
    for name in names:
        match = re.match(r"(\d+)_", name)
        if not match or int(match.group(1)) >= num_classes:
            raise UserError("%s needs file names '{label}_...' with label in 0..%d; %r is not"
                            % (what, num_classes - 1, name))
        labels.append(int(match.group(1)))
    return labels


def labels_or_none(names: Sequence[str], num_classes: int) -> Optional[List[int]]:
    try:
        return labels_from_names(names, num_classes, "labels")
    except UserError:
        return None


def encode_images(model, paths: Sequence[str], preprocess: Callable, device: str, batch_size: int = 64,
                  workers: int = 2):
    """(N, D) unit-norm image embeddings in file order, decoded by DataLoader workers."""
    import torch
    import torch.nn.functional as F

    loader = torch.utils.data.DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate_images,
                                         pin_memory=torch.device(device).type == "cuda")
    features = []
    with torch.no_grad(), progress(total=len(paths), desc="images", unit="img") as bar:
        for _, images in image_batches(loader):
            with autocast(device):
                embeddings = model.encode_image(images.to(device, non_blocking=True))  # (B, D)
            features.append(F.normalize(embeddings.float(), dim=-1).cpu())
            bar.update(len(images))
    return torch.cat(features)


def build_zero_shot_weights(model, tokenizer, classnames: Sequence[str], templates: Sequence[prompt_templates.Template],
                            num_classes_per_batch: int, device: str):
    """open_clip's build_zero_shot_classifier for OpenAI's models, whose encode_text has no `normalize`: (D, C) class
    embeddings, each the mean of its normalised template embeddings, renormalised."""
    import torch
    import torch.nn.functional as F

    columns = []
    for start in range(0, len(classnames), num_classes_per_batch):
        batch = classnames[start:start + num_classes_per_batch]
        texts = [prompt_templates.fill_in(template, name) for name in batch for template in templates]
        embeddings = F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1)  # (classes * templates, D)
        embeddings = embeddings.reshape(len(batch), len(templates), -1).mean(dim=1)
        columns.append(F.normalize(embeddings, dim=-1))  # (classes, D)
    return torch.cat(columns).t()  # (D, C)


def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[prompt_templates.Template],
                     device: str, backend: str = "open_clip"):
    """(C, D) unit-norm class embeddings: per class, mean of the normalised template embeddings, renormalised
    (open_clip's builder for open_clip models, which takes template strings and callables alike)."""
    import torch

    if backend == "open_clip":
        from open_clip import build_zero_shot_classifier
    else:
        build_zero_shot_classifier = build_zero_shot_weights
    with torch.no_grad(), autocast(device):
        weights = build_zero_shot_classifier(model, tokenizer, [clean_class_name(c) for c in classnames], templates,
                                             num_classes_per_batch=CLASSES_PER_TEXT_BATCH, device=device)  # (D, C)
    return weights.float().t().cpu()


def write_predictions(path: str, names: Sequence[str], predictions: Sequence[int]) -> None:
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "label"])
        writer.writerows(zip(names, (int(p) for p in predictions)))


def evaluation(predictions, labels: Sequence[int], classnames: Sequence[str]) -> dict:
    """Accuracy overall and per class; "correct" is each image's hit (1) or miss (0) in the CSV's order, so two
    template sets can be compared image by image (the report's paired interval)."""
    correct = [int(p) == t for p, t in zip(predictions, labels)]
    per_class = {}
    for index, name in enumerate(classnames):
        hits = [c for c, t in zip(correct, labels) if t == index]
        per_class[str(index)] = {"name": name, "n_images": len(hits),
                                 "accuracy": sum(hits) / len(hits) if hits else None}
    return {"accuracy": sum(correct) / len(correct), "n_images": len(correct), "n_correct": sum(correct),
            "per_class": per_class, "correct": "".join("1" if c else "0" for c in correct)}


class ClassEmbeddings:
    """Each template set's (C, D) class embeddings, built once per run however often it is asked for: the ensemble
    of the predictions and of the prompt table is one text pass, and so is a --templates set that --compare-prompts
    also compares."""

    def __init__(self, model, tokenizer, classnames: Sequence[str], device: str, backend: str):
        self.model, self.tokenizer, self.classnames, self.device, self.backend = (model, tokenizer, classnames,
                                                                                  device, backend)
        self.built: Dict[Tuple[prompt_templates.Template, ...], object] = {}

    def __call__(self, templates: Sequence[prompt_templates.Template]):
        key = tuple(templates)
        if key not in self.built:
            self.built[key] = class_embeddings(self.model, self.tokenizer, self.classnames, templates, self.device,
                                               self.backend)
        return self.built[key]


def prompt_table(rows: Sequence[Tuple[str, float]]) -> str:
    """Markdown table of (templates, accuracy) rows."""
    lines = ["| prompt | accuracy |", "| --- | ---: |"]
    for title, accuracy in rows:
        lines.append("| %s | %.2f %% |" % (title.replace("{}", "{object}").replace("|", "\\|"), 100 * accuracy))
    return "\n".join(lines) + "\n"


def compare_prompts(out_csv: str, features, text: ClassEmbeddings, names: Sequence[str], labels: Sequence[int],
                    about: dict) -> List[Tuple[str, float]]:
    """Each of COMPARED_SETS classifies the already encoded images: OUT.prompt_<set>.csv and .eval.json, as a run
    with --templates <set> --evaluate writes them. Returns the report's three templates' (text, accuracy) rows."""
    report, rows = dict(prompt_templates.REPORT_TEMPLATES), []
    for key in COMPARED_SETS:
        templates = prompt_templates.template_set(key)
        predictions = (features @ text(templates).t()).argmax(dim=1).tolist()
        write_predictions(compared_path(out_csv, key), names, predictions)
        result = dict(evaluation(predictions, labels, text.classnames), **about, templates=key,
                      n_templates=len(templates))
        write_json(compared_path(out_csv, key, ".eval.json"), result)
        if key in report:
            rows.append((report[key], result["accuracy"]))
    return rows


def sampled_images(total: int, count: int, seed: int) -> List[int]:
    """The places of the images plot_top5 shows: `count` of `total` drawn with `seed`, in their order."""
    return sorted(random.Random(seed).sample(range(total), min(count, total)))


def plot_top5(path: str, folder: str, names: Sequence[str], probabilities, classnames: Sequence[str],
              labels: Optional[Sequence[int]] = None, chosen: Optional[Sequence[int]] = None) -> List[str]:
    """One PNG, a row per chosen image (sampled_images; all by default): the image beside a bar chart of its top-5
    class probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = range(len(names)) if chosen is None else chosen
    figure, axes = plt.subplots(len(chosen), 2, figsize=(9, 2.6 * len(chosen)), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 2]})
    for row, index in enumerate(chosen):
        top = probabilities[index].topk(min(TOP_K, len(classnames)))
        axes[row][0].imshow(load_rgb(os.path.join(folder, names[index])), interpolation="nearest")
        truth = " (true: %s)" % clean_class_name(classnames[labels[index]]) if labels else ""
        axes[row][0].set_title(names[index] + truth, fontsize=9)
        axes[row][0].axis("off")
        prompts = ["a photo of a %s" % clean_class_name(classnames[i]) for i in top.indices.tolist()]
        axes[row][1].barh(range(len(prompts))[::-1], top.values.tolist(), color="tab:blue")
        axes[row][1].set_yticks(range(len(prompts))[::-1])
        axes[row][1].set_yticklabels(prompts, fontsize=9)
        axes[row][1].set_xlim(0, 1)
        axes[row][1].set_xlabel("probability")
    figure.tight_layout()
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=120)
    plt.close(figure)
    return [names[i] for i in chosen]


def sidecar(out_csv: str, suffix: str) -> str:
    """Report files live beside the CSV: pred.csv -> pred.eval.json, pred.prompts.md, pred.top5.png."""
    return os.path.splitext(out_csv)[0] + suffix


def compared_path(out_csv: str, key: str, suffix: str = ".csv") -> str:
    """--compare-prompts' files of one template set: pred.csv -> pred.prompt_photo.csv, pred.prompt_photo.eval.json."""
    return sidecar(out_csv, ".prompt_%s%s" % (key, suffix))


def report_files(args: argparse.Namespace) -> List[str]:
    """Every file the run writes beside OUT_CSV."""
    files = []
    for wanted, suffix in ((args.evaluate, ".eval.json"), (args.compare_prompts, ".prompts.md"),
                           (args.plot_top5, ".top5.png")):
        if wanted:
            files.append(sidecar(args.out_csv, suffix))
    if args.compare_prompts:
        files += [compared_path(args.out_csv, key, suffix) for key in COMPARED_SETS
                  for suffix in (".csv", ".eval.json")]
    return files


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("image_dir", help="folder of images to classify")
    io.add_argument("id2label", help="JSON {\"0\": \"class name\", ...} with ids 0..N-1")
    io.add_argument("out_csv", help="output CSV 'filename,label' (its folder is created)")
    model = parser.add_argument_group("model")
    model.add_argument("--backend", default="auto", choices=("auto", "open_clip", "openai"),
                       help="CLIP library: open_clip_torch, or OpenAI's clip (pip name openai-clip); auto = open_clip "
                            "if it imports, else OpenAI's clip (default %(default)s)")
    model.add_argument("--model", default=None,
                       help="open_clip: model name or open_clip model-config JSON (default %s); openai: OpenAI model "
                            "name (default %s; with a weight file the architecture comes from the file)"
                            % (clip_backend.P1_MODELS["open_clip"][0], clip_backend.P1_MODELS["openai"][0]))
    model.add_argument("--pretrained", default=None,
                       help="open_clip: tag (local cache only), checkpoint file, or 'none' for random weights "
                            "(default %s); openai: 'openai' (the released weights, local cache only) or a weight "
                            "file; default with the default model only" % clip_backend.P1_MODELS["open_clip"][1])
    model.add_argument("--templates", default=DEFAULT_TEMPLATES,
                       help="named template set or a file, one template per line with {} (default %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default %(default)s)")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="DataLoader decoding processes, 0 = in the main process (default %(default)s)")
    run.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    report = parser.add_argument_group("report helpers")
    report.add_argument("--evaluate", action="store_true",
                        help="accuracy from the '{label}_' file-name prefix, printed and written to OUT.eval.json")
    report.add_argument("--compare-prompts", action="store_true",
                        help="classify the same image embeddings with each of %s too (predictions and accuracy -> "
                             "OUT.prompt_<set>.csv, OUT.prompt_<set>.eval.json), and a Markdown table of the report's "
                             "three templates and the --templates ensemble -> OUT.prompts.md"
                             % ", ".join(COMPARED_SETS))
    report.add_argument("--plot-top5", type=int, default=0, metavar="N",
                        help="plot the top-5 class probabilities of N sampled images -> OUT.top5.png")
    report.add_argument("--seed", type=int, default=0, help="seed for the --plot-top5 sample (default %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.plot_top5 < 0:
        parser.error("--batch-size must be >= 1, --workers and --plot-top5 >= 0")
    return args


def model_and_weights(backend: str, model: Optional[str], pretrained: Optional[str]) -> Tuple[str, Optional[str]]:
    """The backend's default model and weights where none were given; 'none'/'random' -> None (random weights)."""
    default_model, default_pretrained = clip_backend.P1_MODELS[backend]
    model = model or default_model
    if pretrained is None:
        if model != default_model:
            raise UserError("--pretrained is needed with --model %s (a tag, a checkpoint file, or 'none'; %s backend)"
                            % (model, backend))
        pretrained = default_pretrained
    return model, None if pretrained.lower() in clip_backend.RANDOM_WEIGHTS else pretrained


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.time()
    # Everything the user could have got wrong is checked before the model loads.
    names = list_images(args.image_dir)
    classnames = read_id2label(args.id2label)
    templates = load_templates(args.templates)
    labels = None
    if args.evaluate or args.compare_prompts:
        labels = labels_from_names(names, len(classnames), "--evaluate/--compare-prompts")
    check_output_file(args.out_csv, "output CSV")
    for path in report_files(args):
        check_output_file(path, "output")
    device = str(resolve_device(args.device))

    import torch

    backend = clip_backend.resolve_backend(args.backend)
    model_name, pretrained = model_and_weights(backend, args.model, args.pretrained)
    model, preprocess, tokenizer = clip_backend.load_clip(model_name, pretrained, device=device, backend=backend)
    # Image embeddings do not depend on the templates: encoded once, whatever the run compares.
    features = encode_images(model, [os.path.join(args.image_dir, n) for n in names], preprocess, device,
                             args.batch_size, args.workers)  # (N, D)
    text = ClassEmbeddings(model, tokenizer, classnames, device, backend)
    similarities = features @ text(templates).t()  # (N, C) cosine similarities
    predictions = similarities.argmax(dim=1).tolist()
    write_predictions(args.out_csv, names, predictions)
    print("wrote %d predictions to %s (%.1f s)" % (len(names), args.out_csv, time.time() - started))

    about = dict(backend=backend, model=model_name, pretrained=pretrained or "none")
    if args.evaluate or args.compare_prompts:
        result = dict(evaluation(predictions, labels, classnames), **about, templates=args.templates,
                      n_templates=len(templates))
    if args.evaluate:
        write_json(sidecar(args.out_csv, ".eval.json"), dict(result, seconds=round(time.time() - started, 2)))
        print("accuracy %.4f (%d/%d)" % (result["accuracy"], result["n_correct"], result["n_images"]))
    if args.compare_prompts:
        rows = compare_prompts(args.out_csv, features, text, names, labels, about)
        rows.append(("ensemble: %s (%d templates)" % (args.templates, len(templates)), result["accuracy"]))
        table = prompt_table(rows)
        with atomic_write(sidecar(args.out_csv, ".prompts.md")) as f:
            f.write(table)
        print(table, end="")
        print("predictions and accuracy of %s -> %s" % (", ".join(COMPARED_SETS),
                                                         compared_path(args.out_csv, "*", ".{csv,eval.json}")))
    if args.plot_top5:
        scale = float(model.logit_scale.detach().exp().clamp(max=100)) if hasattr(model, "logit_scale") else 100.0
        probabilities = torch.softmax(scale * similarities, dim=1)
        shown = plot_top5(sidecar(args.out_csv, ".top5.png"), args.image_dir, names, probabilities, classnames,
                          labels_or_none(names, len(classnames)), sampled_images(len(names), args.plot_top5, args.seed))
        print("top-5 plot of %s -> %s" % (", ".join(shown), sidecar(args.out_csv, ".top5.png")))
    return 0


if __name__ == "__main__":
    run_main(main)
