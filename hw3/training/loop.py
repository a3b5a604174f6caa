"""The training loop's parts, for p2_train.py (nanoGPT's train.py over model.py: the script is the command line,
this is the loop): the process group, random streams, the optimiser and its schedule, the caption loss, one epoch,
validation and its scores, and the resumable state.

Every architecture trains through the same functions: the loss is taken over the decoder's output indices
(`decoder.vocab.targets`: the identity for GPT-2, the compact layer's rows for the from-scratch decoders), and a
decoder with an `attention_penalty` (attention-gru) adds it to the loss.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hw3.evaluation import metrics
from hw3.data import datasets
from hw3.util import safe_load
from hw3.data.images import image_batches
from hw3.util.device import autocast, resolve_device
from hw3.util.errors import UserError, progress
from hw3.util.files import atomic_write
from hw3.util.resources import HalvingBatches
from hw3.models.decoding import DecodingSettings
from hw3.models.search import decode_captions
from hw3.data.tokenizer import BPETokenizer

MAX_TRAINABLE = 35_000_000  # the course grades only checkpoints below 35M trained parameters
STATE_FORMAT = "hw3-p2-train-state/1"
WARMUP_SHARE = 0.1  # warm-up takes at most this share of a run's optimiser steps, so a short run reaches its lr


# ----------------------------------------------------------------------------------------------- budget

def check_budget(decoder) -> Dict[str, int]:
    """The trainable parameter count per part; refuses to train a model the course would not grade."""
    summary = decoder.parameter_summary()
    parts = ", ".join("%s %s" % (k, format(v, ",")) for k, v in summary.items())
    print("parameters: %s" % parts, file=sys.stderr)
    if summary["trainable"] >= MAX_TRAINABLE:
        raise UserError("%s trainable parameters is over the course's limit of %s (%s): choose a smaller PEFT "
                        "setting, fewer cross-attention layers or a narrower from-scratch decoder" % (format(summary["trainable"], ","),
                                                                    format(MAX_TRAINABLE, ","), parts))
    return summary


# ----------------------------------------------------------------------------------------------- processes

class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, device_arg: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device_arg)
        if self.world_size > 1:  # torchrun: this process's GPU is its local rank's
            cuda = self.device.type == "cuda"
            if cuda:
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo")
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def rng_state() -> dict:
    """Every random stream, as tensors and plain values, so that safe_load reads it back."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return dict(python=random.getstate(), numpy=(name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def grad_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


# ----------------------------------------------------------------------------------------------- optimisation

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


def optimizer_step(model, optimizer, scheduler, scaler, grad_clip: float) -> None:
    """One optimiser step on the accumulated gradients: clipped (after unscaling), skipped by the scaler on inf."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def effective_warmup(asked: int, total_steps: int) -> int:
    """--warmup-steps within WARMUP_SHARE of the run: 500 steps suit COCO's thousands a epoch, not 16."""
    return min(asked, int(total_steps * WARMUP_SHARE))


def make_optimizer(decoder, args: argparse.Namespace, total_steps: int):
    """AdamW with weight decay on matrices only (nanoGPT's rule), warmup + cosine per optimiser step over the
    cross-entropy epochs' total_steps, then --scst-lr, constant, for the self-critical epochs."""
    params = [p for p in decoder.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    warmup = effective_warmup(args.warmup_steps, total_steps)
    after = args.scst_lr / args.lr if getattr(args, "scst_epochs", 0) else None
    schedule = WarmupCosine(warmup, total_steps, min(1.0, args.min_lr / args.lr), after)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)



# ----------------------------------------------------------------------------------------------- loss and validation

def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the target positions (padding is -100). logits (B, T, vocab) with targets (B, T), or
    logits (M, vocab) already taken at the M target positions (decoder(..., positions=targets != -100)) with the
    targets (B, T) or already taken there (M,)."""
    if logits.dim() == 2 and targets.dim() == 2:
        targets = targets[targets != datasets.IGNORE_INDEX]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=datasets.IGNORE_INDEX, label_smoothing=label_smoothing)



@torch.no_grad()
def validate(captioner, val_loader, val, val_tokens, args, device, amp: bool) -> dict:
    """Validation captions through captioner's generate, teacher-forced loss on every reference caption."""
    decoder = captioner.decoder
    captioner.eval()
    predictions, loss_sum, count = {}, 0.0, 0
    keys = val.keys()
    pieces = HalvingBatches("validation")  # a CUDA out-of-memory error halves the batch

    def one_batch(index, visuals) -> Tuple[List[List[int]], float, int]:
        with autocast(device, amp):
            tokens = captioner.image_tokens(visuals.to(device))  # (B, N, width)
            ids = captioner.generate(tokens, DecodingSettings(method=args.val_decode, beam_size=args.val_beam_size,
                                                              max_len=args.val_max_len))
            rows = [(r, caption) for r, i in enumerate(index) for caption in val_tokens[i]]
            inputs, targets = datasets.caption_targets([c for _, c in rows])
            repeat = torch.tensor([r for r, _ in rows], device=device)
            targets = targets.to(device)
            positions = targets != datasets.IGNORE_INDEX
            logits = decoder(inputs.to(device), image_tokens=tokens.index_select(0, repeat), positions=positions)
            targets = decoder.vocab.targets(targets)[positions]  # (M,); a compact layer's unknown ids are ignored
        n = int((targets != datasets.IGNORE_INDEX).sum())
        return ids, float(caption_loss(logits, targets)) * n, n

    for index, visuals in image_batches(progress(val_loader, desc="validation", leave=False)):
        ids = []
        for piece_ids, loss, n in pieces(len(index), lambda s, e: one_batch(index[s:e], visuals[s:e])):
            ids += piece_ids
            loss_sum += loss
            count += n
        for i, caption in zip(index, decode_captions(ids)):
            predictions[keys[i]] = caption
    return dict(predictions=predictions, val_loss=loss_sum / max(1, count))


def score(predictions: dict, val, names, clip, device) -> Dict[str, Optional[float]]:
    """The --val-metrics of the validation captions against the references as written, through metrics (as
    p2_evaluate scores), as {field: score} (a skipped metric is None), plus "mean" when its four are there."""
    keys = val.keys()
    result = metrics.score_captions(predictions, dict(zip(keys, val.references)),
                                    metrics.Scoring(names, clip=clip, device=str(device)),
                                    paths={k: val.path(i) for i, k in enumerate(keys)})
    out = {k.lower(): (float(result[k]) if k in result else None) for k in metrics.result_keys(names)}
    if all(out.get(k.lower()) is not None for k in metrics.MEAN_OF):
        out["mean"] = sum(out[k.lower()] for k in metrics.MEAN_OF) / len(metrics.MEAN_OF)
    return out



# ----------------------------------------------------------------------------------------------- state

def save_state(path: str, **state) -> None:
    with atomic_write(path, "wb", what="the training state --resume continues from") as f:
        torch.save(dict(state, format=STATE_FORMAT), f)


def load_state(path: str) -> dict:
    state = safe_load.load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError("%s is not a p2_train.py training state" % path)
    return state


def resume(path: str, settings: dict, captioner, optimizer, scheduler, scaler, world: Dist) -> dict:
    state = load_state(path)
    if state["settings"] != settings:
        old = state["settings"]
        changed = ["%s %r -> %r" % (k if k in ("encoder", "decoder") else "--" + k.replace("_", "-"), old.get(k),
                                    settings.get(k)) if k not in ("decoder",) else "the decoder config"
                   for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        raise UserError("cannot --resume %s: its settings changed (%s); rerun with the original arguments, or train "
                        "anew into another --out" % (path, "; ".join(changed)))
    if state["world_size"] != world.world_size:
        raise UserError("cannot --resume %s: it was trained by %d process(es), this run has %d"
                        % (path, state["world_size"], world.world_size))
    captioner.decoder.load_trainable_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][world.rank])
    return state


def log_line(path: str, **record) -> None:
    """One JSONL line; a full disk is one line (a torn last line is dropped by --resume and skipped by readers)."""
    from hw3.util import resources

    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        if resources.disk_full(err) is None:
            raise
        raise UserError(resources.disk_full_line(path, "the training log")) from None



# ----------------------------------------------------------------------------------------------- one epoch

class BatchSplit:
    """How many pieces each micro-batch is cut into: 1 until a CUDA out-of-memory error, doubled at each one, for
    the rest of the run. The pieces' losses are weighted by their share of the micro-batch's target tokens (and
    captions, for the attention penalty), so the gradient is the planned batch's up to float rounding."""

    def __init__(self):
        self.pieces = 1

    def ranges(self, rows: int) -> List[Tuple[int, int]]:
        size = max(1, math.ceil(rows / self.pieces))
        return [(start, min(rows, start + size)) for start in range(0, rows, size)]


def micro_batch_loss(model, decoder, batch, rows: Tuple[int, int], count: int, device, amp: bool, args,
                     penalised: bool) -> torch.Tensor:
    """The loss of captions rows[0]:rows[1] of a micro-batch, weighted by their share of its `count` target tokens
    (the attention penalty by their share of its captions)."""
    visuals, inputs, targets = (t[rows[0]:rows[1]] for t in batch)
    with autocast(device, amp):
        targets = targets.to(device)
        positions = targets != datasets.IGNORE_INDEX
        out = model(visuals.to(device, non_blocking=True), inputs.to(device), positions=positions,
                    return_attention=penalised)  # (M, vocab): no logits on padding
        logits, attentions = out if penalised else (out, None)
        wanted = decoder.vocab.targets(targets)[positions]  # (M,); a compact layer's unknown ids are ignored
        loss = caption_loss(logits, wanted, args.label_smoothing)
        loss = loss * (int((wanted != datasets.IGNORE_INDEX).sum()) / max(1, count))
        if penalised:
            loss = loss + decoder.attention_penalty(attentions, positions) * ((rows[1] - rows[0]) / len(batch[0]))
    return loss


def fit_micro_batch(model, decoder, batch, closes_group: bool, group_size: int, scaler, args, world: Dist,
                    amp: bool, penalised: bool, split: BatchSplit) -> float:
    """Forward and backward of one micro-batch in split.pieces; DDP syncs the gradients only on the group's last
    piece. Returns the micro-batch's loss."""
    targets = batch[2].to(world.device)
    count = int((decoder.vocab.targets(targets)[targets != datasets.IGNORE_INDEX] != datasets.IGNORE_INDEX).sum())
    pieces = split.ranges(len(batch[0]))
    loss = 0.0
    for k, rows in enumerate(pieces):
        last = closes_group and k == len(pieces) - 1
        sync = model.no_sync() if world.world_size > 1 and not last else contextlib.nullcontext()
        with sync:
            piece = micro_batch_loss(model, decoder, batch, rows, count, world.device, amp, args, penalised)
            scaler.scale(piece / group_size).backward()
        loss += float(piece.detach())
    return loss


def fit_group(model, decoder, group: list, group_size: int, scaler, args, world: Dist, amp: bool, penalised: bool,
              split: BatchSplit, log_path: str, step: int) -> float:
    """fit_micro_batch of the group's newest micro-batch; after an out-of-memory error the pieces double and the
    whole group so far is redone from zeroed gradients. Returns the newest micro-batch's loss."""
    from hw3.util import resources

    todo = group[-1:]
    while True:
        try:
            for batch in todo:
                loss = fit_micro_batch(model, decoder, batch, batch is group[-1] and len(group) == group_size,
                                       group_size, scaler, args, world, amp, penalised, split)
            return loss
        except RuntimeError as err:
            if not resources.is_out_of_memory(err) or split.pieces >= len(group[-1][0]):
                raise
        model.zero_grad(set_to_none=True)
        split.pieces, todo = split.pieces * 2, group
        rows = math.ceil(len(group[-1][0]) / split.pieces)
        resources.release_memory()
        print("out of GPU memory at step %d: each micro-batch now in %d pieces of at most %d captions, the "
              "gradients accumulated to the planned batch" % (step + 1, split.pieces, rows), file=sys.stderr,
              flush=True)
        if world.main:
            log_line(log_path, kind="out_of_memory", where="training", step=step + 1, pieces=split.pieces,
                     batch_size=rows)


def train_epoch(epoch: int, model, captioner, loader, optimizer, scheduler, scaler, args, world: Dist, amp: bool,
                log_path: str, step: int, split: Optional[BatchSplit] = None) -> int:
    """One pass over the training pairs; returns the optimiser step count. A CUDA out-of-memory error cuts the
    micro-batches in pieces (`split`) and redoes the accumulation group, so the step is the planned one."""
    n_micro = len(loader)
    decoder = captioner.decoder
    penalised = getattr(decoder.cfg, "attention_reg", 0) > 0 and hasattr(decoder, "attention_penalty")
    split = split or BatchSplit()
    captioner.train()
    running, seen, started, group = 0.0, 0, time.time(), []
    bar = progress(loader, desc="epoch %d/%d" % (epoch + 1, args.epochs), disable=not world.main)
    for micro, batch in enumerate(bar):
        group_start = micro - micro % args.grad_accum
        group_size = min(args.grad_accum, n_micro - group_start)
        group.append(batch)
        running += fit_group(model, decoder, group, group_size, scaler, args, world, amp, penalised, split,
                             log_path, step)
        seen += 1
        if len(group) < group_size:
            continue
        group = []
        optimizer_step(model, optimizer, scheduler, scaler, args.grad_clip)
        step += 1
        if world.main and step % args.log_every == 0:
            bar.set_postfix(loss="%.3f" % (running / seen))
            log_line(log_path, kind="step", epoch=epoch + 1, step=step, loss=running / seen,
                     lr=scheduler.get_last_lr()[0], seconds=round(time.time() - started, 2))
            running, seen = 0.0, 0
    return step


# ----------------------------------------------------------------------------------------------- self-critical

def sample_pairs(samples: List[List[int]], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and targets (B, K) of sampled captions (ids without the end token): the end token is a
    target only where the caption ended, i.e. came out shorter than max_len. K stops at the last target, so a
    caption cut at the decoder's last position never feeds one more."""
    inputs, targets = datasets.caption_targets(samples)
    for row, ids in enumerate(samples):
        if len(ids) >= max_len:  # cut by max_len: it never sampled the end token
            targets[row, len(ids)] = datasets.IGNORE_INDEX
    width = max(len(ids) + (len(ids) < max_len) for ids in samples)  # the last target's column, plus one
    return inputs[:, :width], targets[:, :width]


def baseline_of(rewards: torch.Tensor) -> torch.Tensor:
    """The "new self-critical" baseline (B, K): for each sample, the mean reward of its image's other samples."""
    K = rewards.shape[1]
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)


def scst_epoch(epoch: int, model, captioner, loader, keys: List[str], reward, optimizer, scheduler, scaler, args,
               world: Dist, amp: bool, log_path: str, step: int) -> Tuple[int, dict]:
    """One self-critical pass over the training images (Rennie et al. 2017): K sampled captions per image through the
    one search, rewarded by `reward(image indices, captions)` (CIDEr-D, plus the CLIP term), minus the baseline (the
    image's other samples, or its greedy caption), as a policy gradient on the trained parameters: the sampled
    tokens' log-probabilities from one teacher-forced pass. Returns the step count and the epoch's reward figures."""
    decoder, K = captioner.decoder, args.scst_samples
    max_len = min(args.val_max_len, decoder.max_text_len - 1)  # as search.generate caps it
    tokenizer = BPETokenizer()  # built once: reading its merges took most of the reward's time when built per step
    captioner.train()
    totals = dict(reward=0.0, baseline=0.0, images=0, reward_seconds=0.0, sample_seconds=0.0)
    started = time.time()
    bar = progress(loader, desc="scst %d/%d" % (epoch + 1, args.epochs + args.scst_epochs), disable=not world.main)
    for index, visuals in image_batches(bar):
        t0 = time.time()
        with autocast(world.device, amp):
            tokens = captioner.image_tokens(visuals.to(world.device, non_blocking=True))  # (B, N, width)
            samples = captioner.generate(tokens, DecodingSettings(method="sample", temperature=args.scst_temperature,
                                                                  captions_per_image=K, max_len=max_len,
                                                                  seed=args.seed),
                                         image_keys=["%d/%s" % (epoch, keys[i]) for i in index])
            greedy = captioner.generate(tokens, DecodingSettings(method="greedy", max_len=max_len)) \
                if args.scst_baseline == "greedy" else None
        t1 = time.time()
        rows = [i for i in index for _ in range(K)]
        ended = [len(ids) < max_len for ids in samples]  # the rest were cut by the length limit
        rewards = torch.tensor(reward(rows, decode_captions(samples, tokenizer), ended),
                               dtype=torch.float32).view(-1, K)  # (B, K)
        base = baseline_of(rewards) if greedy is None else \
            torch.tensor(reward(list(index), decode_captions(greedy, tokenizer),
                                [len(ids) < max_len for ids in greedy]), dtype=torch.float32).view(-1, 1)
        t2 = time.time()
        inputs, targets = sample_pairs(samples, max_len)
        targets = targets.to(world.device)
        positions = targets != datasets.IGNORE_INDEX
        advantage = (rewards - base).view(-1, 1).expand_as(targets).to(world.device)[positions]  # (M,)
        with autocast(world.device, amp):
            logits = model(tokens.repeat_interleave(K, dim=0), inputs.to(world.device), positions=positions)
            logp = F.log_softmax(logits.float(), dim=-1).gather(
                1, decoder.vocab.targets(targets)[positions].unsqueeze(1)).squeeze(1)  # (M,)
            loss = -(logp * advantage).sum() / max(1, int(positions.sum()))
        scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scheduler, scaler, args.grad_clip)
        step += 1
        totals["reward"] += float(rewards.sum())
        totals["baseline"] += float(base.expand_as(rewards).sum())
        totals["images"] += len(index)
        totals["sample_seconds"] += t1 - t0
        totals["reward_seconds"] += t2 - t1
        if world.main and step % args.log_every == 0:
            bar.set_postfix(reward="%.3f" % (totals["reward"] / (totals["images"] * K)))
            log_line(log_path, kind="step", epoch=epoch + 1, step=step, loss=float(loss.detach()),
                     reward=float(rewards.mean()), lr=scheduler.get_last_lr()[0],
                     seconds=round(time.time() - started, 2))
    seconds = time.time() - started
    n = max(1, totals["images"] * K)
    return step, dict(phase="scst", mean_reward=totals["reward"] / n, mean_baseline=totals["baseline"] / n,
                      reward_share=round(totals["reward_seconds"] / max(seconds, 1e-9), 4),
                      sample_share=round(totals["sample_seconds"] / max(seconds, 1e-9), 4))
