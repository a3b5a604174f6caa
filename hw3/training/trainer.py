"""One training run of a TrainingConfig (p2_train.py's, and the pipeline's): setup, resume or start, the epochs,
validate-and-keep after each; nanoGPT's train.py, with the command line in cli.py and the loop in loop.py.

Writes to --out: best.pt + best.json (trainable tensors + the config that rebuilds the model, via captioner.py),
last_state.pt (everything --resume needs, rewritten atomically at each epoch end), log.jsonl, val_predictions.json.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from hw3.models import registry
from hw3.models.captioner import build_captioner, read_checkpoint_config
from hw3.models.output_vocab import captions_output_ids
from hw3.util import safe_load
from hw3.util.errors import UserError, run_main
from hw3.util.files import atomic_write, check_writable_dir, write_json
from hw3.training.cli import command_settings, parse_config, validation_metrics
from hw3.training.config import TrainingConfig
from hw3.training.data import TrainingData, build_data, caption_length, load_splits
from hw3.training.loop import train_epoch
from hw3.training.optimiser import WARMUP_SHARE, check_budget, effective_warmup, grad_scaler, make_optimizer
from hw3.training.scst import make_reward, scst_epoch
from hw3.training.state import Dist, TrainingState, log_line, model_settings, resume, rng_state, save_state
from hw3.training.validation import Keeper, load_clip


def main(argv: Optional[List[str]] = None) -> int:
    return train(parse_config(argv))


def train(config: TrainingConfig) -> int:
    """One training run of `config` (the pipeline's entry, and the command line's)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # missing weights fail at once (hw3_download.sh fetches them)
    world = Dist(config.run.device)
    try:
        return _run(config, world)
    finally:
        world.close()


def _run(config: TrainingConfig, world: Dist) -> int:
    started = time.time()
    config, captioner, train_set, val, summary = _setup(config, world)
    clip = load_clip(config, world.device) if world.main or config.scst.scst_clip_weight > 0 else None
    setup_seconds = time.time() - started  # repeated by every run, unlike filling the feature cache
    data = build_data(config, train_set, val, captioner, world)
    reward = make_reward(config, train_set, clip, world.device) if config.scst.scst_epochs else None
    state, total_steps, warmup = _training_state(config, captioner, world, len(data.loader))
    state.settings = model_settings(config, captioner)
    best = _resume_or_start(state, dict(parameters=summary, steps=total_steps, warmup_steps=warmup,
                                        setup_seconds=round(setup_seconds, 1)))
    keeper = Keeper(state, data, val, clip, dict(warmup_steps=warmup, total_steps=total_steps))
    if config.scst.init_from and state.first_epoch == 0 and world.main:
        best = keeper.validate_and_keep(0, dict(kind="epoch", epoch=0, step=0, phase="init"), best)
    best = _fit(state, data, keeper, train_set.keys(), reward, best)
    if world.main and best is not None:
        print("best %s %.4f at epoch %d: %s" % (best["metric"], best["value"], best["epoch"],
                                                 os.path.join(config.run.out, "best.pt")), file=sys.stderr)
    return 0


def _setup(config: TrainingConfig, world: Dist):
    """Options checked, folders checked, data read, caption length set, the model built (and --init-from loaded):
    in that order, so a wrong option fails before any work. Returns the config resolved (the caption length, the
    PEFT method, the metric names) with the model, the caption sets and the trainable parameter counts."""
    if not config.run.resume and os.path.isfile(os.path.join(config.run.out, "last_state.pt")):
        raise UserError("%s holds a training state from an earlier run: pass --resume to continue it, or choose "
                        "another --out" % config.run.out)
    names = validation_metrics(config)
    args = command_settings(config)  # the architecture options' flat names, which the registry reads
    decoder_config = registry.config_from_args(args)  # option errors first (it resolves --peft), then the folders
    config = TrainingConfig.from_options(vars(args)).replace(val_metrics=names)
    _check_folders(config, world)
    train_set, val = load_splits(config.data)
    config = caption_length(config, train_set, world)
    if registry.ARCHITECTURES[config.model.arch].from_scratch:  # the compact output layer: the training captions' ids
        decoder_config = registry.config_from_args(command_settings(config), captions_output_ids(
            train_set.captions, config.data.max_caption_tokens))
    seed = config.optimisation.seed
    torch.manual_seed(seed)  # identical initial trainable weights on every rank
    random.seed(seed)
    np.random.seed(seed)
    captioner = build_captioner(config.model.encoder, decoder_config)
    summary = check_budget(captioner.decoder)
    captioner.to(world.device)
    if config.scst.init_from:
        init_from(config.scst.init_from, captioner)
    return config, captioner, train_set, val, summary


def _check_folders(config: TrainingConfig, world: Dist) -> None:
    for folder, what in ((config.run.out, "--out"), (config.data.feature_cache, "--feature-cache")):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError("%s %s is not a folder" % (what, folder))
        if folder and world.main:
            check_writable_dir(folder, what + " folder")


def init_from(checkpoint: str, captioner) -> None:
    """--init-from: the trained tensors of a checkpoint of this very model (arch and decoder config)."""
    meta = read_checkpoint_config(checkpoint)
    ours = captioner.decoder.cfg.to_dict()
    theirs = dict(meta["decoder"])
    ours.pop("checkpoint", None)
    differ = sorted(k for k in set(ours) | set(theirs) if json.dumps(ours.get(k)) != json.dumps(theirs.get(k)))
    if meta["arch"] != captioner.arch or differ:
        raise UserError("--init-from %s is a %s with another config than this run's %s (differs in: %s)"
                        % (checkpoint, meta["arch"], captioner.arch, ", ".join(differ) or "arch"))
    captioner.decoder.load_trainable_state_dict(safe_load.load_tensors(checkpoint, "checkpoint"))


def _training_state(config: TrainingConfig, captioner, world: Dist, micro_batches: int):
    """The model (DDP-wrapped under torchrun), optimiser, schedule and scaler; the run's steps and warm-up."""
    o = config.optimisation
    model = captioner  # its forward is the training step's model call; under torchrun, DDP wraps it
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            captioner, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    total_steps = o.epochs * math.ceil(micro_batches / o.grad_accum)
    optimizer, scheduler = make_optimizer(captioner.decoder, config, total_steps)
    warmup = effective_warmup(o.warmup_steps, total_steps)
    if world.main:
        print("warm-up: %d of %d optimiser steps (--warmup-steps %d, at most %d%% of the run), then cosine from "
              "--lr %g to --min-lr %g" % (warmup, total_steps, o.warmup_steps, round(100 * WARMUP_SHARE), o.lr,
                                          o.min_lr), file=sys.stderr)
    amp = world.device.type == "cuda" and not o.no_amp
    state = TrainingState(config, captioner, model, optimizer, scheduler, grad_scaler(amp), world,
                          os.path.join(config.run.out, "log.jsonl"))
    return state, total_steps, warmup


def _resume_or_start(state: TrainingState, start: dict) -> Optional[dict]:
    """--resume: the saved state loaded and the interrupted epoch's log lines dropped; else a new log and args.json.
    Returns the best validation so far (None before any)."""
    config, world, log_path = state.config, state.world, state.log_path
    out = config.run.out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(config.optimisation.seed + world.rank)  # per-rank dropout and augmentation streams
    if config.run.resume and os.path.isfile(os.path.join(out, "last_state.pt")):
        saved = resume(state, os.path.join(out, "last_state.pt"), state.settings)
        if world.main:
            if os.path.isfile(log_path) and os.path.getsize(log_path) > saved["log_bytes"]:
                with open(log_path, "r+b") as f:
                    f.truncate(saved["log_bytes"])  # drop the step lines of the epoch that was interrupted
            print("resuming after epoch %d (best %s)" % (saved["epoch"], saved["best"]), file=sys.stderr)
        state.first_epoch = saved["epoch"]
        return saved["best"]
    state.first_epoch = 0
    if world.main:
        with atomic_write(log_path):
            pass
        write_json(os.path.join(out, "args.json"), vars(command_settings(config)))
        log_line(log_path, kind="start", settings=state.settings, time=round(time.time(), 1),
                 world_size=world.world_size, **start)  # run_all's estimate
    return None


def _fit(state: TrainingState, data: TrainingData, keeper: Keeper, keys: List[str], reward,
         best: Optional[dict]) -> Optional[dict]:
    """The cross-entropy epochs, then the self-critical ones, each validated and saved for --resume; --stop-after
    ends the run early."""
    config, world = state.config, state.world
    total_epochs = config.optimisation.epochs + config.scst.scst_epochs
    stop_after = config.run.stop_after
    end_epoch = min(total_epochs, state.first_epoch + stop_after) if stop_after else total_epochs
    for epoch in range(state.first_epoch, end_epoch):
        started = time.time()
        if epoch < config.optimisation.epochs:
            data.sampler.set_epoch(epoch)
            train_epoch(state, epoch, data.loader)
            figures = {}
        else:
            data.scst_loader.sampler.set_epoch(epoch)
            figures = scst_epoch(state, epoch, data.scst_loader, keys, reward)
        record = dict(kind="epoch", epoch=epoch + 1, step=state.step, train_seconds=round(time.time() - started, 2),
                      **figures)
        if world.main:
            best = keeper.validate_and_keep(epoch + 1, record, best)
        _save(state, epoch + 1, best)
    return best


def _save(state: TrainingState, epoch: int, best: Optional[dict]) -> None:
    """Everything --resume needs, after `epoch`, written by rank 0 (every rank's random streams)."""
    rngs = state.world.gather(rng_state())
    if state.world.main:
        scaler = state.scaler
        save_state(os.path.join(state.config.run.out, "last_state.pt"), epoch=epoch, step=state.step, best=best,
                   settings=state.settings, world_size=state.world.world_size,
                   trainable=state.decoder.trainable_state_dict(), optimizer=state.optimizer.state_dict(),
                   scheduler=state.scheduler.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
                   rng=rngs, log_bytes=os.path.getsize(state.log_path))
    state.world.barrier()


if __name__ == "__main__":
    run_main(main)
