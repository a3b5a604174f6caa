"""The optimiser and its learning-rate schedule (nanoGPT's rules: AdamW, decay on matrices only, warm-up then
cosine), the fp16 gradient scaler, and the course's limit on what may be trained."""
from __future__ import annotations

import math
import sys
from typing import Dict, Optional

import torch

from hw3.util.errors import UserError
from hw3.training.config import TrainingConfig

MAX_TRAINABLE = 35_000_000  # the course grades only checkpoints below 35M trained parameters
WARMUP_SHARE = 0.1  # warm-up takes at most this share of a run's optimiser steps, so a short run reaches its lr


def check_budget(decoder) -> Dict[str, int]:
    """The trainable parameter count per part; refuses to train a model the course would not grade."""
    summary = decoder.parameter_summary()
    parts = ", ".join("%s %s" % (k, format(v, ",")) for k, v in summary.items())
    print("parameters: %s" % parts, file=sys.stderr)
    if summary["trainable"] >= MAX_TRAINABLE:
        raise UserError("%s trainable parameters is over the course's limit of %s (%s): choose a smaller PEFT "
                        "setting, fewer cross-attention layers or a narrower from-scratch decoder"
                        % (format(summary["trainable"], ","), format(MAX_TRAINABLE, ","), parts))
    return summary


class WarmupCosine:
    """LambdaLR factor: linear warmup to 1, then cosine down to min_lr / lr (an object, so it pickles); after
    `total` steps, `after` if given (self-critical training's constant scst_lr / lr)."""

    def __init__(self, warmup: int, total: int, floor: float, after: Optional[float] = None):
        self.warmup, self.total, self.floor, self.after = warmup, total, floor, after

    def __call__(self, step: int) -> float:
        if self.after is not None and step >= self.total:
            return self.after
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress_ = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress_))


def effective_warmup(asked: int, total_steps: int) -> int:
    """--warmup-steps within WARMUP_SHARE of the run: 500 steps suit COCO's thousands a epoch, not 16."""
    return min(asked, int(total_steps * WARMUP_SHARE))


def make_optimizer(decoder, config: TrainingConfig, total_steps: int):
    """AdamW with weight decay on matrices only (nanoGPT's rule), warmup + cosine per optimiser step over the
    cross-entropy epochs' total_steps, then --scst-lr, constant, for the self-critical epochs."""
    o = config.optimisation
    params = [p for p in decoder.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=o.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.999))
    warmup = effective_warmup(o.warmup_steps, total_steps)
    after = config.scst.scst_lr / o.lr if config.scst.scst_epochs else None
    schedule = WarmupCosine(warmup, total_steps, min(1.0, o.min_lr / o.lr), after)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def grad_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)
