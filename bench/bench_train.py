"""Training steps/s of p2_train.py's loop with and without the feature cache, real-size models, random weights, CPU.

    .venv/bin/python -m bench.bench_train [--encoder SPEC] [--batch-size 4] [--steps 2]

Both runs go through loop.train_epoch on the same synthetic COCO-like JPEGs (640x480, one 12-word caption each):
without the cache every step decodes, transforms and encodes the images with the frozen ViT; with it, every step
reads fp16 rows from the memory-mapped cache. The ratio is measured in this process; the cache's one-off fill
time is printed too (it is one encoder pass over the images, paid once for all later epochs and runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image


from hw3.data import caption_files, datasets, feature_cache
from hw3.training.cli import parse_config
from hw3.training.loop import train_epoch
from hw3.training.optimiser import grad_scaler, make_optimizer
from hw3.training.state import Dist, TrainingState
from hw3.models import registry
from hw3.models.captioner import build_captioner
from hw3.models.encoder import DEFAULT_ENCODER
from hw3.models.gpt2 import Config, peft_config
from hw3.data.tokenizer import BPETokenizer

CAPTION = "a man riding a wave on top of a surfboard in the middle of the ocean"


def synthetic_coco(folder: str, count: int) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"))
    images = []
    for i in range(count):
        name = "%012d.jpg" % i
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, "images", name), quality=90)
        images.append(dict(id=i, file_name=name))
    annotations = [dict(id=i, image_id=i, caption=CAPTION) for i in range(count)]
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=annotations), f)
    return path


def timed_epoch(captioner, loader, config) -> float:
    optimizer, scheduler = make_optimizer(captioner.decoder, config, total_steps=len(loader))
    state = TrainingState(config, captioner, captioner, optimizer, scheduler, grad_scaler(False), Dist("cpu"),
                          os.devnull)
    started = time.perf_counter()
    train_epoch(state, 0, loader)
    return len(loader) / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default=DEFAULT_ENCODER.split("@")[0] + "@none", help="encoder spec (random weights)")
    p.add_argument("--peft", default="lora", choices=registry.PEFT_METHODS, help="PEFT method")
    p.add_argument("--batch-size", type=int, default=4, help="captions per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    bench = p.parse_args()

    torch.manual_seed(0)
    print("building %s + GPT-2 small (random weights)..." % bench.encoder, file=sys.stderr)
    captioner = build_captioner(bench.encoder, Config(**peft_config(bench.peft)))
    trainable = captioner.decoder.parameter_summary()["trainable"]
    with tempfile.TemporaryDirectory() as tmp:
        annotation = synthetic_coco(tmp, bench.batch_size * bench.steps)
        common = ["--train-json", annotation, "--train-images", os.path.join(tmp, "images"), "--val-json",
                  annotation, "--val-images", os.path.join(tmp, "images"), "--decoder-weights", "unused",
                  "--batch-size", str(bench.batch_size), "--epochs", "1", "--log-every", "1000000",
                  "--max-caption-tokens", "40"]  # p2_train's default is the data's, set only once it reads them
        config = parse_config(common)
        caps = caption_files.load_captions(annotation, os.path.join(tmp, "images"))
        tokens, _, _ = datasets.tokenize_captions(caps.captions, BPETokenizer(), config.data.max_caption_tokens)

        def loader(visuals):
            pairs = datasets.CaptionPairs(visuals, tokens)
            return torch.utils.data.DataLoader(pairs, batch_size=bench.batch_size, shuffle=True,
                                               collate_fn=datasets.collate_pairs)

        started = time.perf_counter()
        cache = feature_cache.build_feature_cache(os.path.join(tmp, "cache"), "train", captioner.encoder, caps,
                                                  feature_cache.Encoding(batch_size=bench.batch_size))
        fill_seconds = time.perf_counter() - started
        cached = loader(datasets.Features(cache))
        timed_epoch(captioner, cached, config)  # warm-up: first-call allocations
        with_cache = timed_epoch(captioner, cached, config)
        without_cache = timed_epoch(captioner, loader(datasets.images(caps, captioner.encoder.transform)), config)
        row_mb = np.load(cache, mmap_mode="r")[0].nbytes / 2 ** 20
    print("encoder %s, decoder GPT-2 small + %s (%s trainable), batch %d, %d steps, %d CPU threads" % (
        bench.encoder, bench.peft, format(trainable, ","), bench.batch_size, bench.steps, torch.get_num_threads()))
    print("without cache: %.3f steps/s" % without_cache)
    print("with cache:    %.3f steps/s" % with_cache)
    print("speed-up:      %.1fx (cache fill: %.1f s for %d images, %.2f MB per image)" % (
        with_cache / without_cache, fill_seconds, len(caps.names), row_mb))


if __name__ == "__main__":
    main()
