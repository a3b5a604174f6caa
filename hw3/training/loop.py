"""The cross-entropy epochs (nanoGPT's train.py loop): micro-batches accumulated to an optimiser step, each cut in
pieces after a CUDA out-of-memory error so that the step stays the planned one.

Every architecture trains through the same functions: the loss is taken over the decoder's output indices
(`decoder.vocab.targets`: the identity for GPT-2, the compact layer's rows for the from-scratch decoders), and a
decoder with an `attention_penalty` (attention-gru) adds it to the loss.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Tuple

import torch
import torch.nn.functional as F

from hw3.data import datasets
from hw3.util import resources
from hw3.util.device import autocast
from hw3.util.errors import progress
from hw3.training.state import TrainingState, log_line


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the target positions (padding is -100). logits (B, T, vocab) with targets (B, T), or
    logits (M, vocab) already taken at the M target positions (decoder(..., positions=targets != -100)) with the
    targets (B, T) or already taken there (M,)."""
    if logits.dim() == 2 and targets.dim() == 2:
        targets = targets[targets != datasets.IGNORE_INDEX]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=datasets.IGNORE_INDEX, label_smoothing=label_smoothing)


def micro_batch_loss(state: TrainingState, batch, rows: Tuple[int, int], count: int,
                     penalised: bool) -> torch.Tensor:
    """The loss of captions rows[0]:rows[1] of a micro-batch, weighted by their share of its `count` target tokens
    (the attention penalty by their share of its captions)."""
    visuals, inputs, targets = (t[rows[0]:rows[1]] for t in batch)
    device, decoder = state.world.device, state.decoder
    with autocast(device, state.amp):
        targets = targets.to(device)
        positions = targets != datasets.IGNORE_INDEX
        out = state.model(visuals.to(device, non_blocking=True), inputs.to(device), positions=positions,
                          return_attention=penalised)  # (M, vocab): no logits on padding
        logits, attentions = out if penalised else (out, None)
        wanted = decoder.vocab.targets(targets)[positions]  # (M,); a compact layer's unknown ids are ignored
        loss = caption_loss(logits, wanted, state.config.optimisation.label_smoothing)
        loss = loss * (int((wanted != datasets.IGNORE_INDEX).sum()) / max(1, count))
        if penalised:
            loss = loss + decoder.attention_penalty(attentions, positions) * ((rows[1] - rows[0]) / len(batch[0]))
    return loss


def fit_micro_batch(state: TrainingState, batch, closes_group: bool, group_size: int, penalised: bool) -> float:
    """Forward and backward of one micro-batch in state.split's pieces; DDP syncs the gradients only on the group's
    last piece. Returns the micro-batch's loss."""
    targets = batch[2].to(state.world.device)
    count = int((state.decoder.vocab.targets(targets)[targets != datasets.IGNORE_INDEX] != datasets.IGNORE_INDEX).sum())
    pieces = state.split.ranges(len(batch[0]))
    loss = 0.0
    for k, rows in enumerate(pieces):
        last = closes_group and k == len(pieces) - 1
        sync = state.model.no_sync() if state.world.world_size > 1 and not last else contextlib.nullcontext()
        with sync:
            piece = micro_batch_loss(state, batch, rows, count, penalised)
            state.scaler.scale(piece / group_size).backward()
        loss += float(piece.detach())
    return loss


def fit_group(state: TrainingState, group: list, group_size: int, penalised: bool) -> float:
    """fit_micro_batch of the group's newest micro-batch; after an out-of-memory error the pieces double and the
    whole group so far is redone from zeroed gradients. Returns the newest micro-batch's loss."""
    todo = group[-1:]
    while True:
        try:
            for batch in todo:
                loss = fit_micro_batch(state, batch, batch is group[-1] and len(group) == group_size, group_size,
                                       penalised)
            return loss
        except RuntimeError as err:
            if not resources.is_out_of_memory(err) or state.split.pieces >= len(group[-1][0]):
                raise
        state.model.zero_grad(set_to_none=True)
        state.split.pieces, todo = state.split.pieces * 2, group
        rows = math.ceil(len(group[-1][0]) / state.split.pieces)
        resources.release_memory()
        print("out of GPU memory at step %d: each micro-batch now in %d pieces of at most %d captions, the "
              "gradients accumulated to the planned batch" % (state.step + 1, state.split.pieces, rows),
              file=sys.stderr, flush=True)
        if state.world.main:
            log_line(state.log_path, kind="out_of_memory", where="training", step=state.step + 1,
                     pieces=state.split.pieces, batch_size=rows)


def train_epoch(state: TrainingState, epoch: int, loader) -> None:
    """One pass over the training pairs, counting optimiser steps in state.step. A CUDA out-of-memory error cuts the
    micro-batches in pieces (state.split) and redoes the accumulation group, so the step is the planned one."""
    n_micro, grad_accum = len(loader), state.config.optimisation.grad_accum
    decoder = state.decoder
    penalised = getattr(decoder.cfg, "attention_reg", 0) > 0 and hasattr(decoder, "attention_penalty")
    state.captioner.train()
    running, seen, started, group = 0.0, 0, time.time(), []
    bar = progress(loader, desc="epoch %d/%d" % (epoch + 1, state.config.optimisation.epochs),
                   disable=not state.world.main)
    for micro, batch in enumerate(bar):
        group_start = micro - micro % grad_accum
        group_size = min(grad_accum, n_micro - group_start)
        group.append(batch)
        running += fit_group(state, group, group_size, penalised)
        seen += 1
        if len(group) < group_size:
            continue
        group = []
        state.optimizer_step()
        if state.logs_now():
            bar.set_postfix(loss="%.3f" % (running / seen))
            log_line(state.log_path, kind="step", epoch=epoch + 1, step=state.step, loss=running / seen,
                     lr=state.scheduler.get_last_lr()[0], seconds=round(time.time() - started, 2))
            running, seen = 0.0, 0
