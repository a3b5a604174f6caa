"""P1 throughput on CPU with the real-size default architecture (random weights: no download needed).

Ours (p1_clip_zeroshot: DataLoader workers, batched forward, one batched text pass) against a naive baseline
measured in the same process (decode, preprocess and encode one image at a time; one prompt at a time), and the
text-embedding cost extrapolated to the course's workload (50 classes x the template set, 2,500 images).

Run: .venv/bin/python -m bench.bench_p1 [--model EVA02-L-14] [--images 8] [--batch-size 4] [--classes 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip_utils
import p1_clip_zeroshot as p1
from common import load_rgb

COURSE_IMAGES, COURSE_CLASSES = 2500, 50


def synthetic_images(folder: str, count: int):
    rng = np.random.RandomState(0)
    names = []
    for i in range(count):
        names.append("%d_%d.png" % (i % COURSE_CLASSES, i))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=clip_utils.P1_MODELS["open_clip"][0], help="open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=8, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=2, help="classes whose template embeddings are timed")
    parser.add_argument("--templates", default=p1.DEFAULT_TEMPLATES)
    args = parser.parse_args()

    torch.manual_seed(0)
    load_time, (model, preprocess, tokenizer) = timed(lambda: clip_utils.load_clip(args.model, None))
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
