"""What a training run carries from step to step and from one run to its --resume: this process's place in a
torchrun job, the TrainingState the loop, validation and SCST share, the random streams, the state file and the log.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from hw3.data import caption_files
from hw3.util import resources, safe_load
from hw3.util.device import resolve_device
from hw3.util.errors import UserError
from hw3.util.files import atomic_write
from hw3.training.config import TrainingConfig
from hw3.util.config import flag_name

STATE_FORMAT = "hw3-p2-train-state/1"

# The options a run's trajectory depends on: --resume refuses to continue a run under others.
TRAJECTORY_OPTIONS = ("raw_captions", "max_caption_tokens", "augment", "val_max_images", "epochs", "batch_size",
                      "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "label_smoothing",
                      "no_amp", "seed", "select")
# Trajectory options added later: recorded only away from their defaults, so earlier runs still resume.
LATER_TRAJECTORY_OPTIONS = dict(train_split=None, val_split=None, val_fraction=caption_files.VAL_FRACTION, scst_epochs=0,
                                init_from=None, scst_samples=5, scst_baseline="mean", scst_lr=2e-5,
                                scst_temperature=1.0, scst_clip_weight=0.0, scst_end_word=False)


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


# ----------------------------------------------------------------------------------------------- the shared state

class BatchSplit:
    """How many pieces each micro-batch is cut into: 1 until a CUDA out-of-memory error, doubled at each one, for
    the rest of the run. The pieces' losses are weighted by their share of the micro-batch's target tokens (and
    captions, for the attention penalty), so the gradient is the planned batch's up to float rounding."""

    def __init__(self):
        self.pieces = 1

    def ranges(self, rows: int) -> List[Tuple[int, int]]:
        size = max(1, math.ceil(rows / self.pieces))
        return [(start, min(rows, start + size)) for start in range(0, rows, size)]


@dataclasses.dataclass
class TrainingState:
    """What one epoch, validation and self-critical training share (nanoGPT keeps these side by side): the model
    (under torchrun the DDP wrapper of `captioner`), its optimiser, schedule and scaler, this process's place in the
    job, the log, the optimiser step count and how micro-batches are split."""
    config: TrainingConfig
    captioner: Any
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    world: Dist
    log_path: str
    step: int = 0
    split: BatchSplit = dataclasses.field(default_factory=BatchSplit)
    first_epoch: int = 0  # the epoch this run starts at (after --resume, the one after the state's)
    settings: Optional[dict] = None  # what --resume requires unchanged (model_settings)

    @property
    def decoder(self):
        return self.captioner.decoder

    @property
    def amp(self) -> bool:
        return self.world.device.type == "cuda" and not self.config.optimisation.no_amp

    def optimizer_step(self) -> None:
        """One optimiser step on the accumulated gradients: clipped (after unscaling), skipped by the scaler on inf."""
        grad_clip = self.config.optimisation.grad_clip
        if grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def logs_now(self) -> bool:
        return self.world.main and self.step % self.config.run.log_every == 0


def log_line(path: str, **record) -> None:
    """One JSONL line; a full disk is one line (a torn last line is dropped by --resume and skipped by readers)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        if resources.disk_full(err) is None:
            raise
        raise UserError(resources.disk_full_line(path, "the training log")) from None


# ----------------------------------------------------------------------------------------------- --resume

def model_settings(config: TrainingConfig, captioner) -> dict:
    """What must not change between a run and its --resume: the model and the options of TRAJECTORY_OPTIONS."""
    cfg = captioner.decoder.cfg.to_dict()
    cfg.pop("checkpoint", None)
    later = {k: config.value(k) for k, default in LATER_TRAJECTORY_OPTIONS.items() if config.value(k) != default}
    if captioner.arch != "gpt2":  # recorded only for the later architectures, so earlier runs still resume
        later["arch"] = captioner.arch
    return dict({k: config.value(k) for k in TRAJECTORY_OPTIONS}, encoder=str(captioner.encoder_spec), decoder=cfg,
                **later)


def save_state(path: str, **state) -> None:
    with atomic_write(path, "wb", what="the training state --resume continues from") as f:
        torch.save(dict(state, format=STATE_FORMAT), f)


def load_state(path: str) -> dict:
    state = safe_load.load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError("%s is not a p2_train.py training state" % path)
    return state


def resume(training: TrainingState, path: str, settings: dict) -> dict:
    """The saved state of `path` loaded into `training`, once its settings are this run's."""
    state = load_state(path)
    world = training.world
    if state["settings"] != settings:
        old = state["settings"]
        changed = ["%s %r -> %r" % (k if k in ("encoder", "decoder") else flag_name(k), old.get(k),
                                    settings.get(k)) if k not in ("decoder",) else "the decoder config"
                   for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        raise UserError("cannot --resume %s: its settings changed (%s); rerun with the original arguments, or train "
                        "anew into another --out" % (path, "; ".join(changed)))
    if state["world_size"] != world.world_size:
        raise UserError("cannot --resume %s: it was trained by %d process(es), this run has %d"
                        % (path, state["world_size"], world.world_size))
    training.decoder.load_trainable_state_dict(state["trainable"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    if training.scaler.is_enabled() and state.get("scaler"):
        training.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][world.rank])
    training.step = state["step"]
    return state
