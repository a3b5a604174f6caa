"""One self-critical (SCST) training step against one cross-entropy step, real-size model, random weights, CPU.

    .venv/bin/python -m bench.bench_scst [--steps 3] [--images 6] [--samples 5] [--threads 1]

The captioner is p2_train.py's default (GPT-2 small with the documented LoRA, cross-attention in every block) with
random weights, reading image tokens of the default encoder's shape (ViT-H/14: 257 tokens of 1280) from a feature
cache of random rows: training with the cache never runs the ViT, so neither does this benchmark. Both steps run
through the training loop's own functions with p2_train.py's settings, alternating in this process:
  cross-entropy  loop.train_epoch over one batch of --batch-size 32 captions of 20 tokens
  self-critical  scst.scst_epoch over one batch of --images images x --samples sampled captions: sampling
                 (captioner.generate, method "sample", max_len --val-max-len 30), the reward (scst.make_reward:
                 CIDEr-D against 5 synthetic references per image, captions decoded with tokenizer.BPETokenizer)
                 and the policy-gradient pass (teacher-forced forward + backward over the samples, optimiser step)
Seconds come from the loop's own records (the step's `seconds` in its log, scst_epoch's sample and reward shares),
so setup outside the step (the epoch's tokenizer) is not counted. Random weights (almost) never draw the end token,
so every sample runs to max_len: the worst case, full-length samples (real ones end after ~10-15 tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from hw3.data import caption_files, datasets
from hw3.training.cli import command_settings, parse_config
from hw3.training.loop import train_epoch
from hw3.training.optimiser import check_budget, grad_scaler, make_optimizer
from hw3.training.scst import make_reward, scst_epoch
from hw3.training.state import Dist, TrainingState
from hw3.models.captioner import Captioner
from hw3.models.registry import config_from_args, decoder_from_config
from hw3.data.images import collate_images
from hw3.models.encoder import DEFAULT_ENCODER, as_spec
from hw3.models.decoding import DecodingSettings
from hw3.models.search import decode_captions
from hw3.data.tokenizer import BPETokenizer

VIT_H14 = dict(tokens=257, width=1280)  # the default encoder's output: CLS + a 16 x 16 patch grid
CAPTION_TOKENS = 20  # a long COCO caption in GPT-2 tokens
REFERENCES = 5  # captions per image, as COCO
WORDS = ("a man woman dog cat riding sitting standing on top of the with in front next to table street red blue "
         "white small large wave surfboard pizza plate grass field near two people ball").split()
REWARD_REPEATS = 5  # the reward timed alone: median of this many
COURSE_TRAIN_IMAGES = 10_000  # docs/gpu-day.md's estimate: about 10,000 P2 training images


class FeatureCacheOnly:
    """Stands in for the frozen ViT-H/14 until `release_encoder()`, as training from the feature cache does."""

    spec = as_spec(DEFAULT_ENCODER)
    width = VIT_H14["width"]


def synthetic_split(count: int, tokenizer: BPETokenizer, rng: np.random.Generator) -> caption_files.CaptionSet:
    """`count` images with REFERENCES captions each of exactly CAPTION_TOKENS tokens (random COCO-like words)."""
    def caption() -> str:
        text = ""
        while len(tokenizer.encode(text)) < CAPTION_TOKENS:  # ends: "a" is one token
            longer = (text + " " + str(rng.choice(WORDS))).strip()
            text = longer if len(tokenizer.encode(longer)) <= CAPTION_TOKENS else text
        return text

    captions = [[caption() for _ in range(REFERENCES)] for _ in range(count)]
    return caption_files.CaptionSet("synthetic", "synthetic", ["%012d.jpg" % i for i in range(count)], captions, captions)


def last_logged_seconds(log_path: str) -> float:
    """The `seconds` of the loop's last step record: from the epoch's start to after its optimiser step."""
    with open(log_path, encoding="utf-8") as f:
        return float(json.loads(f.read().splitlines()[-1])["seconds"])


def timed_reward(reward, samples, samples_per_image: int, max_len: int, tokenizer: BPETokenizer) -> float:
    """Seconds of one step's reward alone, as scst_epoch computes it (decoding included)."""
    started = time.perf_counter()
    rows = [i for i in range(len(samples) // samples_per_image) for _ in range(samples_per_image)]
    reward(rows, decode_captions(samples, tokenizer), [len(ids) < max_len for ids in samples])
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind (median), after one warm-up each")
    p.add_argument("--images", type=int, help="images per SCST step (default p2_train's: --batch-size // --samples)")
    p.add_argument("--samples", type=int, default=5, help="sampled captions per image (p2_train --scst-samples)")
    p.add_argument("--batch-size", type=int, default=32, help="captions per cross-entropy step (p2_train's)")
    p.add_argument("--max-len", type=int, default=30, help="sample length limit (p2_train --val-max-len)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    bench = p.parse_args()
    if bench.steps < 1 or bench.samples < 2 or bench.threads < 1:
        p.error("--steps and --threads must be at least 1, --samples at least 2 (the mean baseline)")
    torch.set_num_threads(bench.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(["--train-json", "unused", "--train-images", "unused", "--val-json", "unused",
                               "--val-images", "unused", "--decoder-weights", "unused", "--peft", "lora",
                               "--batch-size", str(bench.batch_size), "--epochs", "1", "--scst-epochs", "1",
                               "--scst-samples", str(bench.samples), "--val-max-len", str(bench.max_len),
                               "--log-every", "1", "--max-caption-tokens", "40"])  # as before the data's default
        args = command_settings(config)
        images = bench.images or max(1, args.batch_size // args.scst_samples)
        cfg = dataclasses.replace(config_from_args(args), checkpoint=None, encoder_dim=VIT_H14["width"])
        print("building GPT-2 small + LoRA (random weights)...", file=sys.stderr)
        captioner = Captioner(FeatureCacheOnly(), decoder_from_config(cfg))
        captioner.release_encoder()
        trainable = check_budget(captioner.decoder)["trainable"]

        tokenizer = BPETokenizer()
        count = max(args.batch_size, images)
        train = synthetic_split(count, tokenizer, np.random.default_rng(0))
        cache = os.path.join(tmp, "train.npy")
        rows = torch.randn(count, VIT_H14["tokens"], VIT_H14["width"], generator=torch.Generator().manual_seed(0))
        np.save(cache, rows.half().numpy())  # (count, N, width), as feature_cache.build_feature_cache writes it
        features = datasets.Features(cache)
        tokens, _, _ = datasets.tokenize_captions(train.captions, tokenizer, args.max_caption_tokens)
        assert all(len(t) == CAPTION_TOKENS for caps in tokens for t in caps)
        xe_pairs = datasets.CaptionPairs(features, [caps[:1] for caps in tokens[:args.batch_size]])
        xe_loader = DataLoader(xe_pairs, batch_size=args.batch_size, collate_fn=datasets.collate_pairs)
        scst_loader = DataLoader(Subset(features, range(images)), batch_size=images, collate_fn=collate_images)
        reward = make_reward(config, train, None, "cpu")

        optimizer, scheduler = make_optimizer(captioner.decoder, config, total_steps=1)
        log_path = os.path.join(tmp, "log.jsonl")
        state = TrainingState(config, captioner, captioner, optimizer, scheduler, grad_scaler(False), Dist("cpu"),
                              log_path)
        xe_seconds, scst_parts = [], []
        for repeat in range(bench.steps + 1):  # the first of each kind is the warm-up; all draw the same samples
            train_epoch(state, 0, xe_loader)
            xe = last_logged_seconds(log_path)
            figures = scst_epoch(state, args.epochs, scst_loader, train.keys(), reward)
            step = last_logged_seconds(log_path)
            sample, rewarding = figures["sample_share"] * step, figures["reward_share"] * step
            if repeat:
                xe_seconds.append(xe)
                scst_parts.append((step, sample, rewarding, step - sample - rewarding))

        # the steps' draws (settings, seed, image keys) from the weights after them: did any sample end early?
        keys = ["%d/%s" % (args.epochs, train.keys()[i]) for i in range(images)]
        with torch.no_grad():
            visuals = torch.stack([features[i][1] for i in range(images)])  # (B, N, width) fp16, as the loader gives
            drawn = captioner.generate(visuals, DecodingSettings(
                method="sample", temperature=args.scst_temperature, captions_per_image=args.scst_samples,
                max_len=args.val_max_len, seed=args.seed), image_keys=keys)
        full = sum(len(ids) == args.val_max_len for ids in drawn)
        alone = statistics.median(timed_reward(reward, drawn, args.scst_samples, args.val_max_len, tokenizer)
                                  for _ in range(REWARD_REPEATS))

    xe = statistics.median(xe_seconds)
    scst, sample, rewarding, gradient = (statistics.median(part) for part in zip(*scst_parts))
    print("GPT-2 small + LoRA (%s trainable) + cross-attention to %d x %d image tokens (random feature-cache rows), "
          "random weights; %d CPU thread(s); median of %d steps after one warm-up"
          % (format(trainable, ","), VIT_H14["tokens"], VIT_H14["width"], torch.get_num_threads(), bench.steps))
    print("samples at max_len %d: %d of %d (worst case: full-length samples; real ones end after ~10-15 tokens)"
          % (args.val_max_len, full, len(drawn)))
    print("cross-entropy step (%d captions of %d tokens): %7.2f s" % (args.batch_size, CAPTION_TOKENS, xe))
    print("SCST step (%d images x %d samples):        %7.2f s  = %.2fx the cross-entropy step"
          % (images, args.scst_samples, scst, scst / xe))
    print("  sampling                                  %7.2f s  (%4.1f %% of the step)" % (sample, 100 * sample / scst))
    print("  reward (decode + CIDEr-D)                 %7.3f s  (%4.2f %% of the step; timed alone: %.1f ms)"
          % (rewarding, 100 * rewarding / scst, 1e3 * alone))
    print("  policy gradient (forward, backward, step) %7.2f s  (%4.1f %% of the step; %.2fx the cross-entropy step)"
          % (gradient, 100 * gradient / scst, gradient / xe))
    steps = -(-COURSE_TRAIN_IMAGES // images)
    print("the reward runs on the CPU on a GPU machine too: %s steps per epoch of %s images x %.1f ms = %.0f s "
          "(this CPU)" % (format(steps, ","), format(COURSE_TRAIN_IMAGES, ","), 1e3 * alone, steps * alone))


if __name__ == "__main__":
    main()
