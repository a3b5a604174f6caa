"""The command line shared by the miniature world's model trainers (train_clip.py, train_vit.py, train_gpt2.py)."""
from __future__ import annotations

import argparse
import time
from typing import Callable

from hw3.util.errors import UserError


def training_parser(doc: str, out: str, out_help: str, seed: int, seed_help: str, steps: int, batch: int,
                    batch_help: str) -> argparse.ArgumentParser:
    """--out, --seed, --steps, --batch and --threads with a trainer's defaults; the trainer adds its own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=out, help="%s (default %%(default)s)" % out_help)
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=batch, help=batch_help)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the cores are shared)")
    return parser


def run_training(args: argparse.Namespace, what: str, train: Callable[[], dict], min_batch: int = 1) -> int:
    """Checks --steps/--batch, sets the torch threads, runs `train` and prints where the model went and how long it
    took."""
    import torch

    if args.steps < 1 or args.batch < min_batch:
        raise UserError("--steps must be >= 1 and --batch >= %d" % min_batch)
    torch.set_num_threads(args.threads)
    start = time.time()
    result = train()
    print("%s written to %s in %.0f s: %s" % (what, args.out, time.time() - start, result))
    return 0
