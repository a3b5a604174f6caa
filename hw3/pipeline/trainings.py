"""A stage's p2_train.py runs on disk: each trains in OUT/STAGE/NAME/train.new and is swapped in for train/ when it
ends, with a record (finished.json) of its arguments, input fingerprints and checkpoint, so a finished training is
skipped while still true and an interrupted one resumes. context.train_run drives them; this module is its parts."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import TYPE_CHECKING, Dict, List, Optional

from hw3.data import caption_files
from hw3.pipeline.layout import P2_DATA
from hw3.training.state import load_state
from hw3.util.errors import UserError
from hw3.util.files import file_sha256, read_json, write_json

if TYPE_CHECKING:
    from hw3.pipeline.context import Context

TRAIN_DONE = "finished.json"  # inside a finished training folder: its argv, input fingerprints, seconds
TRAINING_RECORD = ("lr", "epochs", "batch_size", "grad_accum")  # p2_train.py's args.json keys the report names
TRAINING_JSON = ("args.json", "best.json")  # p2_train.py's files that name paths (its arguments, --init-from)
# p2_train.py options that change how fast a training runs, not what it learns: left out of its identity (finished.json,
# started.json, the stage settings), so the same command on another machine reuses the training. --device stays, as
# the device type it resolves to (cpu or cuda: fp16 autocast runs on CUDA only).
RUNTIME_OPTIONS = ("--workers", "--num-workers", "--val-batch-size", "--encode-batch-size", "--log-every",
                   "--stop-after")


def without_runtime_options(argv: List[str]) -> List[str]:
    """`argv` less every RUNTIME_OPTIONS flag and its value (a record written before they were left out compares
    equal to a new one)."""
    return [a for n, a in enumerate(argv)
            if a not in RUNTIME_OPTIONS and (n == 0 or argv[n - 1] not in RUNTIME_OPTIONS)]


def train_config(ctx: Context) -> Dict[str, dict]:
    """Per-attempt p2_train.py options from --train-config: {"lora": {"lr": 5e-4, "epochs": 8}, ...}. Which entries
    it may name is run_all's check (check_train_config), made before any stage."""
    if not ctx.args.train_config:
        return {}
    config = read_json(ctx.args.train_config, "training config")
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise UserError("training config %s must be {method: {p2_train.py option: value}}, e.g. "
                        "{\"lora\": {\"lr\": 0.0005, \"epochs\": 8}}" % ctx.args.train_config)
    return config


def train_split(ctx: Context) -> str:
    """train.json, or its first --train-max-images training images (a smoke run) written into OUT: a COCO file
    as COCO, any other caption format as {file name: [captions]} of its train split."""
    if not ctx.args.train_max_images:
        return ctx.data("train_json")
    data = read_json(ctx.data("train_json"), "annotation file")
    caption_file = caption_files.read_captions(data, "annotation file")
    if caption_file.format == "coco":
        keep = {img["id"] for img in data["images"][:ctx.args.train_max_images]}
        data = dict(data, images=[i for i in data["images"] if i["id"] in keep],
                    annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    else:
        split = caption_files.resolve_split(caption_file, None, "train")
        names, _ = caption_files.split_names(caption_file, split, show=False)
        data = {n: caption_file.captions[n] for n in names[:ctx.args.train_max_images]}
    path = ctx.path("p2", "train_subset.json")
    write_json(path, data, indent=None)
    return path


def run_folder(ctx: Context, method: str, which: str = "done", stage: str = "p2") -> str:
    """OUT/STAGE/NAME/train (the finished training, the one scored) or train.new (one in progress, swapped in when
    it ends) or train.old (the finished one for the moment of the swap); NAME is a PEFT method in p2."""
    return ctx.path(stage, method, "train" if which == "done" else "train." + which)


def restore_interrupted_swap(ctx: Context, method: str, stage: str = "p2") -> None:
    """A kill between the two renames of a swap leaves train.old without train: put it back."""
    done, old = run_folder(ctx, method, stage=stage), run_folder(ctx, method, "old", stage)
    if os.path.isdir(old):
        if os.path.isdir(done):
            shutil.rmtree(old)
        else:
            os.replace(old, done)


def swap_in(ctx: Context, method: str, stage: str = "p2") -> None:
    """train.new -> train; the earlier finished training is removed only once the new one is in place."""
    done, new, old = (run_folder(ctx, method, which, stage) for which in ("done", "new", "old"))
    if os.path.isdir(done):
        os.replace(done, old)
    os.replace(new, done)
    if os.path.isdir(old):
        shutil.rmtree(old)


def discard_unfinished_trainings(ctx: Context, stage: str = "p2", names: Optional[List[str]] = None) -> None:
    """With the stage done and still true, a train.new folder is a forced or abandoned training that was killed; a
    rerun of it would start from its beginning, so it is removed."""
    for method in ctx.args.methods if names is None else names:
        restore_interrupted_swap(ctx, method, stage)
        new = run_folder(ctx, method, "new", stage)
        if os.path.isdir(new):
            ctx.say("%s: %s: removing the unfinished training in %s (%s is done and still true without it)"
                    % (stage, method, new, stage))
            shutil.rmtree(new)


def train_inputs(ctx: Context) -> Dict[str, Optional[str]]:
    return ctx.portable(ctx.inputs([ctx.data(k) for k in P2_DATA]))


def readable_json(path: str, what: str):
    """The JSON in `path`, or None when it is absent or cannot be read (a damaged record counts as not done)."""
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path, what)
    except UserError:
        return None


def checkpoint_seal(path: str) -> dict:
    """What finished.json keeps of best.pt, so a checkpoint truncated or replaced later is no longer finished."""
    return dict(bytes=os.path.getsize(path), sha256=file_sha256(path))


def finished_training(ctx: Context, method: str, argv: List[str], inputs: dict, stage: str = "p2") -> Optional[dict]:
    """The finished training's record when it was made with these arguments from these inputs and its checkpoint is
    there, unchanged; else None. A record, checkpoint or log that cannot be read means not finished: retrained."""
    folder = run_folder(ctx, method, stage=stage)
    record_file, best = os.path.join(folder, TRAIN_DONE), os.path.join(folder, "best.pt")
    if not (os.path.isfile(record_file) and os.path.isfile(best)):
        return None
    record = readable_json(record_file, "training record")
    damage = None
    if not isinstance(record, dict):
        damage = "%s cannot be read or is not a training record" % record_file
    elif isinstance(record.get("checkpoint"), dict) and record["checkpoint"] != checkpoint_seal(best):
        damage = "%s no longer matches the size and hash in %s" % (best, TRAIN_DONE)
    elif loss_log(folder, strict=True) is None:
        damage = "%s has a line that cannot be read" % os.path.join(folder, "log.jsonl")
    if damage:
        ctx.say("%s: %s: %s, so the training counts as not finished" % (stage, method, damage))
        return None
    return record if without_runtime_options(record.get("argv") or []) == argv and record.get("inputs") == inputs \
        else None


def resumable(ctx: Context, new: str, record_argv: List[str], inputs: dict) -> bool:
    """An interrupted training continues when its start record names these arguments and inputs and its state file
    (if any) loads; a damaged one starts afresh."""
    started = readable_json(os.path.join(new, "started.json"), "training start record")
    if not started_as(started, record_argv, inputs):
        return False
    state = os.path.join(new, "last_state.pt")
    if os.path.isfile(state):
        try:
            load_state(state)
        except (UserError, RuntimeError, OSError, EOFError, ValueError) as err:
            ctx.say("%s cannot be read (%s): the interrupted training starts afresh" % (state, str(err)[:200]))
            return False
    return True


def portable_training_files(ctx: Context, folder: str) -> None:
    """A finished training's JSON files with their paths named <DATA>/... and <OUT>/..., so OUT moves whole."""
    for name in TRAINING_JSON:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            write_json(path, ctx.portable(read_json(path, "training file")))


def started_as(started, argv: List[str], inputs: dict) -> bool:
    """An interrupted training's start record names these arguments (runtime options aside) and inputs."""
    return isinstance(started, dict) and without_runtime_options(started.get("argv") or []) == argv \
        and started.get("inputs") == inputs


def repeatable_seconds(folder: str, seconds: float, resumed: bool) -> Optional[float]:
    """The part of a training that another attempt repeats: loading the models (p2_train's "setup_seconds") and
    everything after its "start" line, which is written once the data are ready; what lies between, filling the
    feature cache, is done once for all attempts. None when unknown (resumed, or an older log)."""
    if resumed:
        return None
    for line in loss_log(folder):
        if line.get("kind") == "start" and "time" in line:
            return round(max(0.0, time.time() - float(line["time"])) + float(line.get("setup_seconds", 0.0)), 1)
    return None


def loss_log(folder: str, strict: bool = False) -> Optional[List[dict]]:
    """The training's log lines; a line that cannot be read (a torn last line) is left out, or with `strict` makes
    the answer None."""
    log = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(log):
        return []
    lines = []
    with open(log, encoding="utf-8", errors="replace") as f:
        for text in f:
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                line = None
            if isinstance(line, dict):
                lines.append(line)
            elif strict:
                return None
    return lines
