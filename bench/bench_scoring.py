"""Two costs run_all pays many times over one val split, each against its baseline measured in the same process, on
real-size shapes with random weights (no download needed):

  CLIPScore's image side: run_all scores every P2 attempt, every decoding setting and every opt-in stage row on the
    same val images. metrics.clip_image_embeddings answers a repeated request from its per-process store;
    the baseline computes the embeddings at every scoring (what it did before).
    CLIP ViT-B/32 (the course's CLIPScore model, open_clip architecture, random weights) on --images synthetic
    224 px images, scored --scorings times.
  Beam search's candidate choice: each step keeps the 2K best of K beams x 50,257 tokens per image. search._beam ranks
    each beam's best 2K tokens, then the K x 2K of those; the baseline adds the beam scores to all K x V log-probs and
    ranks them all. Both pick the same candidates (checked, values and tokens).

Run: .venv/bin/python -m bench.bench_scoring [--images 64] [--scorings 6] [--images-per-batch 16] [--beam-size 5]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from hw3.evaluation import metrics

VOCAB = 50257


def timed(fn, repeat: int = 1):
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def synthetic_images(folder: str, n: int):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(os.path.join(folder, "%04d.png" % i))
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def bench_clip(args) -> None:
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_images(tmp, args.images)
        baseline, fresh = timed(lambda: [metrics._compute_image_embeddings(paths, model, preprocess, 64, "cpu", 0)
                                         for _ in range(args.scorings)])
        ours, kept = timed(lambda: [metrics.clip_image_embeddings(paths, model, preprocess, 64, "cpu", 0)
                                    for _ in range(args.scorings)])
    assert all(torch.equal(a, b) for a, b in zip(fresh, kept)), "the reused embeddings differ from fresh ones"
    print("CLIPScore image side, %d images scored %d times (ViT-B/32, CPU):" % (args.images, args.scorings))
    print("  baseline (embedded at every scoring) %6.2f s" % baseline)
    print("  ours (embedded once, then reused)    %6.2f s   %.1fx faster, identical embeddings"
          % (ours, baseline / ours))


def flat_choice(logp: torch.Tensor, scores: torch.Tensor, K: int):
    A = scores.shape[0]
    candidates = (logp + scores.view(-1, 1)).view(A, K * logp.shape[-1])
    top_scores, top_index = candidates.topk(2 * K, dim=1)
    return top_scores, torch.div(top_index, logp.shape[-1], rounding_mode="floor"), top_index % logp.shape[-1]


def two_stage_choice(logp: torch.Tensor, scores: torch.Tensor, K: int):
    """search._beam's choice, step by step."""
    A = scores.shape[0]
    per_beam, per_token = logp.topk(min(2 * K, logp.shape[-1]), dim=1)
    width = per_beam.shape[1]
    top_scores, top_index = (per_beam + scores.view(-1, 1)).view(A, K * width).topk(2 * K, dim=1)
    return top_scores, torch.div(top_index, width, rounding_mode="floor"), \
        per_token.view(A, K * width).gather(1, top_index)


def bench_beam(args) -> None:
    torch.manual_seed(0)
    A, K = args.images_per_batch, args.beam_size
    logp = torch.log_softmax(torch.randn(A * K, VOCAB) * 3, dim=-1)
    scores = -torch.rand(A, K) * 10
    repeat = 20
    baseline, flat = timed(lambda: flat_choice(logp, scores, K), repeat)
    ours, two = timed(lambda: two_stage_choice(logp, scores, K), repeat)
    assert all(torch.equal(a, b) for a, b in zip(flat, two)), "the two choices differ"
    print("beam search candidate choice, %d images x %d beams x %d tokens, one step (CPU, %d threads):"
          % (A, K, VOCAB, torch.get_num_threads()))
    print("  baseline (all K x V ranked)          %6.2f ms" % (baseline * 1000))
    print("  ours (each beam's 2K, then K x 2K)   %6.2f ms   %.1fx faster, the same candidates"
          % (ours * 1000, baseline / ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--scorings", type=int, default=6)
    parser.add_argument("--images-per-batch", type=int, default=16)
    parser.add_argument("--beam-size", type=int, default=5)
    args = parser.parse_args()
    bench_beam(args)
    bench_clip(args)


if __name__ == "__main__":
    main()
