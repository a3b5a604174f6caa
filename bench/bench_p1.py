"""P1 on CPU with the real-size default architecture (random weights: no download needed).

Throughput (default): ours (p1_clip_zeroshot: DataLoader workers, batched forward, one batched text pass) against a
naive baseline measured in the same process (decode, preprocess and encode one image at a time; one prompt at a
time), and the text-embedding cost extrapolated to the course's workload (50 classes x the template set, 2,500 images).

--stage: run_all's P1 stage, the old way (five p1_clip_zeroshot runs, each loading the CLIP and encoding the images,
the first building the ensemble's class embeddings twice) against the one run it is now, in the same process, with the
same random weights (seeded) and the same answers (checked).

Run: .venv/bin/python -m bench.bench_p1 [--model EVA02-L-14] [--images 8] [--batch-size 4] [--classes 2]
     .venv/bin/python -m bench.bench_p1 --stage [--images 8] [--classes 50]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hw3.models import clip_backend
from hw3.zeroshot import classify as p1
from hw3.zeroshot import prompt_templates
from hw3.data.images import load_rgb

COURSE_IMAGES, COURSE_CLASSES = 2500, 50


def synthetic_images(folder: str, count: int, classes: int = COURSE_CLASSES):
    rng = np.random.RandomState(0)
    names = []
    for i in range(count):
        names.append("%d_%d.png" % (i % classes, i))
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)).save(os.path.join(folder, names[-1]))
    return names


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def naive_images(model, preprocess, folder, names):
    with torch.no_grad():
        return torch.stack([F.normalize(model.encode_image(preprocess(load_rgb(os.path.join(folder, n)))[None])[0], dim=0)
                            for n in names])


def naive_text(model, tokenizer, classnames, templates):
    with torch.no_grad():
        rows = []
        for name in classnames:
            each = [F.normalize(model.encode_text(tokenizer([t.replace("{}", name)]))[0], dim=0) for t in templates]
            rows.append(F.normalize(torch.stack(each).mean(dim=0), dim=0))
        return torch.stack(rows)


def seeded_load(model: str):
    """The architecture with the same random weights at every call (the old stage loaded it five times)."""
    torch.manual_seed(0)
    return clip_backend.load_clip(model, None)


def old_stage(args, root: str, names, classnames) -> dict:
    """run_all's former P1 stage (five runs), step for step: p1_clip_zeroshot.main for the ensemble with --evaluate
    --compare-prompts --plot-top5, then for each report template and the single prompt with --templates SET
    --evaluate; every run loaded the CLIP, built its set's class embeddings and encoded every image, and
    --compare-prompts built the three templates' and the ensemble's class embeddings again. Returns the accuracies."""
    folder = os.path.join(root, "images")
    paths = [os.path.join(folder, n) for n in names]
    labels = p1.labels_from_names(names, len(classnames), "bench")
    accuracies = {}
    for key in (args.templates,) + p1.COMPARED_SETS:
        model, preprocess, tokenizer = seeded_load(args.model)
        templates = p1.load_templates(key)
        text = p1.class_embeddings(model, tokenizer, classnames, templates, "cpu")
        features = p1.encode_images(model, paths, preprocess, "cpu", args.batch_size, args.workers)
        similarities = features @ text.t()
        accuracies[key] = p1.evaluation(similarities.argmax(dim=1).tolist(), labels, classnames)["accuracy"]
        if key == args.templates:
            for compared in [[t] for _, t in prompt_templates.REPORT_TEMPLATES] + [templates]:
                p1.class_embeddings(model, tokenizer, classnames, compared, "cpu")
            probabilities = torch.softmax(float(model.logit_scale.detach().exp().clamp(max=100)) * similarities, dim=1)
            p1.plot_top5(os.path.join(root, "old.top5.png"), folder, names, probabilities, classnames, labels,
                         p1.sampled_images(len(names), 3, 0))
        del model
    return accuracies


def warm_up(args, root: str, names, classnames) -> None:
    """First-use costs (imports, allocator, font cache) paid before either timing: one load, one image, one prompt,
    one plot."""
    model, preprocess, tokenizer = seeded_load(args.model)
    folder = os.path.join(root, "images")
    features = p1.encode_images(model, [os.path.join(folder, names[0])], preprocess, "cpu", 1, args.workers)
    text = p1.class_embeddings(model, tokenizer, classnames[:1], ["a photo of a {}."], "cpu")
    p1.plot_top5(os.path.join(root, "warm_up.png"), folder, names[:1], (features @ text.t()).softmax(dim=1),
                 classnames[:1])


def new_stage(args, root: str) -> dict:
    """run_all's P1 stage now: one p1_clip_zeroshot.main run with the flags stage_p1 passes. Returns the accuracies."""
    out = os.path.join(root, "out", "pred.csv")
    torch.manual_seed(0)  # the weights seeded_load gives: main loads right away
    p1.main([os.path.join(root, "images"), os.path.join(root, "id2label.json"), out, "--evaluate", "--compare-prompts", "--plot-top5", "3", "--model", args.model,
             "--pretrained", "none", "--device", "cpu", "--workers", str(args.workers), "--batch-size",
             str(args.batch_size), "--templates", args.templates])
    accuracies = {args.templates: json.load(open(p1.sidecar(out, ".eval.json")))["accuracy"]}
    for key in p1.COMPARED_SETS:
        accuracies[key] = json.load(open(p1.compared_path(out, key, ".eval.json")))["accuracy"]
    return accuracies


def bench_stage(args) -> None:
    classnames = ["class %d" % i for i in range(args.classes)]
    print("run_all's P1 stage: %s, random weights, %d images, %d classes x (%s + %s), torch %s, %d CPU threads"
          % (args.model, args.images, len(classnames), args.templates, ", ".join(p1.COMPARED_SETS),
             torch.__version__, torch.get_num_threads()), flush=True)
    with tempfile.TemporaryDirectory() as root:
        os.mkdir(os.path.join(root, "images"))
        names = synthetic_images(os.path.join(root, "images"), args.images, len(classnames))
        with open(os.path.join(root, "id2label.json"), "w") as f:
            json.dump({str(i): name for i, name in enumerate(classnames)}, f)
        warm_up(args, root, names, classnames)
        old_time, old = timed(lambda: old_stage(args, root, names, classnames))
        print("old, five runs: %.1f s" % old_time, flush=True)
        new_time, new = timed(lambda: new_stage(args, root))
        print("new, one run: %.1f s" % new_time, flush=True)
    assert old == new, "the old and the new stage disagree: %s against %s" % (old, new)
    print("P1 stage: old five runs %.1f s, new one run %.1f s: %.2fx faster, %.1f s saved (same accuracies: %s)"
          % (old_time, new_time, old_time / new_time, old_time - new_time,
             ", ".join("%s %.3f" % kv for kv in new.items())))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=clip_backend.P1_MODELS["open_clip"][0], help="open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=8, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=None,
                        help="classes whose template embeddings are timed (default 2; with --stage %d, the course's)"
                             % COURSE_CLASSES)
    parser.add_argument("--templates", default=p1.DEFAULT_TEMPLATES)
    parser.add_argument("--stage", action="store_true", help="time run_all's P1 stage, old five runs against one")
    args = parser.parse_args()
    if args.stage:
        args.classes = args.classes or COURSE_CLASSES
        bench_stage(args)
        return
    args.classes = args.classes or 2

    torch.manual_seed(0)
    load_time, (model, preprocess, tokenizer) = timed(lambda: clip_backend.load_clip(args.model, None))
    templates = p1.load_templates(args.templates)
    classnames = ["class %d" % i for i in range(args.classes)]
    print("%s, random weights, %.0fM parameters, built in %.1f s; torch %s, %d CPU threads"
          % (args.model, sum(p.numel() for p in model.parameters()) / 1e6, load_time, torch.__version__,
             torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as folder:
        names = synthetic_images(folder, args.images)
        naive_images(model, preprocess, folder, names[:1])  # warm-up
        naive_time, naive_features = timed(lambda: naive_images(model, preprocess, folder, names))
        paths = [os.path.join(folder, n) for n in names]
        ours_time, features = timed(lambda: p1.encode_images(model, paths, preprocess, "cpu", args.batch_size,
                                                             args.workers))
    assert torch.allclose(features, naive_features, atol=1e-4), "batched image embeddings differ from the naive ones"
    print("images: ours %.2f img/s (batch %d, %d workers), naive one-at-a-time %.2f img/s: %.2fx"
          % (args.images / ours_time, args.batch_size, args.workers, args.images / naive_time, naive_time / ours_time))

    naive_text_time, naive_classes = timed(lambda: naive_text(model, tokenizer, classnames, templates))
    text_time, classes = timed(lambda: p1.class_embeddings(model, tokenizer, classnames, templates, "cpu"))
    assert torch.allclose(classes, naive_classes, atol=1e-4), "batched class embeddings differ from the naive ones"
    prompts = len(classnames) * len(templates)
    print("text: ours %.1f prompts/s, naive one-prompt-at-a-time %.1f prompts/s: %.2fx"
          % (prompts / text_time, prompts / naive_text_time, naive_text_time / text_time))

    per_image, per_class = ours_time / args.images, text_time / len(classnames)
    course_text, course_images = per_class * COURSE_CLASSES, per_image * COURSE_IMAGES
    print("course workload on this CPU (extrapolated): text %d classes x %d templates %.0f s, %d images %.0f s; "
          "text / image time = %.3f"
          % (COURSE_CLASSES, len(templates), course_text, COURSE_IMAGES, course_images, course_text / course_images))


if __name__ == "__main__":
    main()
