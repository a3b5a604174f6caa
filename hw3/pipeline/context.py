"""What every run_all.py stage uses: the run's Context (arguments, paths, device, results so far, the log), the data
folder's layout, a stage's p2_train.py runs (trained in train.new and swapped in when they end, skipped while still
true) and the scoring of a checkpoint's val captions with explicit decoding settings.

run_all.py's stages and the opt-in ones (optional_stages.py) are built from these parts; this module imports neither.
Like run_all.py, it calls the scripts' main() functions in this process (p2_train, p2_inference), so every number
comes from the code a student would run by hand.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from hw3.models import clip_backend
from hw3.evaluation import metrics
from hw3.data import caption_files, datasets
from hw3.inference import predict
from hw3.training import trainer
from hw3.pipeline import records
from hw3.util import resources
from hw3.models import decoding
from hw3.models.decoding import DecodingSettings
from hw3.training import loop
from hw3.models.captioner import config_path, read_checkpoint_config
from hw3.util.device import resolve_device
from hw3.util.errors import UserError, progress
from hw3.util.files import atomic_write, file_sha256, read_json, write_json
from hw3.models.encoder import EncoderSpec
from hw3.data.tokenizer import BPETokenizer

DATA = dict(p1_images="p1_data/val", id2label="p1_data/id2label.json", train_images="p2_data/images/train",
            val_images="p2_data/images/val", train_json="p2_data/train.json", val_json="p2_data/val.json",
            decoder="p2_data/decoder_model.bin", p3_images="p3_data/images")
STAGE_DATA = dict(p1=("p1_images", "id2label"), p2=("train_images", "val_images", "train_json", "val_json", "decoder"),
                  p3=("p3_images", "val_images", "decoder"), report=(),
                  distill=("train_images", "val_images", "train_json", "val_json", "decoder"))
STAGE_DATA["compare"] = STAGE_DATA["scst"] = STAGE_DATA["p2"]  # the same data and feature cache
IMAGE_FOLDERS = ("p1_images", "train_images", "val_images", "p3_images")
# Decoding settings tried on the best attempt; the README default comes first, so a tie keeps it. Every stage reads
# it as run_context.DECODING_GRID (no copy by `from run_context import`), so one assignment changes it for all.
DECODING_GRID = (dict(method="beam", beam_size=3, length_penalty=1.0), dict(method="greedy", beam_size=1),
                 dict(method="beam", beam_size=5, length_penalty=1.0), dict(method="beam", beam_size=3, length_penalty=0.6),
                 dict(method="beam", beam_size=5, length_penalty=1.4))
# p2_train.py options that run_all sets itself, so a --train-config entry may not.
RUN_ALL_OPTIONS = ("arch", "train_json", "train_images", "val_json", "val_images", "decoder_weights", "peft", "out",
                   "resume", "feature_cache", "device", "workers", "encoder", "clip_model", "clip_pretrained")
TRAIN_DONE = "finished.json"  # inside a finished training folder: its argv, input fingerprints, seconds
TRAINING_RECORD = ("lr", "epochs", "batch_size", "grad_accum")  # p2_train.py's args.json keys the report names
# p2_train.py options that change how fast a training runs, not what it learns: left out of its identity (finished.json,
# started.json, the stage settings), so the same command on another machine reuses the training. --device stays, as
# the device type it resolves to (cpu or cuda: fp16 autocast runs on CUDA only).
RUNTIME_OPTIONS = ("--workers", "--num-workers", "--val-batch-size", "--encode-batch-size", "--log-every",
                   "--stop-after")
PARTS = ("stages", "parts")  # OUT/stages/parts/: a stage's finished parts (teacher captions, scored rows)


# ----------------------------------------------------------------------------------------------- context

def merge(into: dict, fragment: dict) -> dict:
    """Nested dicts merged key by key (a later stage adds measures to an earlier stage's rows)."""
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def _strings(obj, convert: Callable[[str], str]):
    """`obj` with `convert` applied to every string in it, dict keys included (tuples become lists, as in JSON)."""
    if isinstance(obj, str):
        return convert(obj)
    if isinstance(obj, dict):
        return {_strings(k, convert): _strings(v, convert) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strings(v, convert) for v in obj]
    return obj


class Context:
    """What every stage reads: the arguments, the paths, the device, the results so far; and how to say things."""

    def __init__(self, args: argparse.Namespace, argv: List[str]):
        self.args, self.argv = args, argv
        self.out = args.out
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = str(resolve_device(args.device))
        self.results: Dict[str, object] = {}
        self.log_path = os.path.join(self.out, "run_all.log")
        self.train_options: Dict[str, argparse.Namespace] = {}  # p2_train.py's parsed options per method
        self._fingerprints: Dict[str, Optional[str]] = {}
        self.stage: Optional[str] = None  # the stage running now: its --force redoes its kept parts too
        self._scoring_max_len: Optional[int] = None

    def data(self, key: str) -> str:
        if self.args.captions:  # another dataset: one caption file, one image folder, split by p2_data's rules
            return dict(train_json=self.args.captions, val_json=self.args.captions, train_images=self.args.images,
                        val_images=self.args.images, decoder=self.args.decoder_weights or "")[key]
        return os.path.join(self.args.data, DATA[key])

    def split_flags(self) -> List[str]:
        """p2_inference.py's flags that caption only the val split of a --captions file (the one p2_train.py
        validated on); none for the course's val folder."""
        return ["--captions", self.args.captions, "--split", "val"] if self.args.captions else []

    def val_split(self) -> Optional[str]:
        """metrics.evaluate's split: the val share of a --captions file; the whole of the course's val.json."""
        return "val" if self.args.captions else None

    def scoring_max_len(self) -> int:
        """The length every scored caption may reach: covers the longest val reference and its end token, never
        below the README's 30 (decoding.covering_max_len; the decoder's positions cap it in search)."""
        if self._scoring_max_len is None:
            val = caption_files.load_captions(self.data("val_json"), self.data("val_images"), split=self.val_split(),
                                              default_split="val")
            _, _, longest = datasets.tokenize_captions(val.references, BPETokenizer(), sys.maxsize)
            self._scoring_max_len = decoding.covering_max_len(longest)
        return self._scoring_max_len

    def _places(self, absolute: bool = False):
        """(spelled prefix, its name) for the data and output folders, the longer first (OUT may hold DATA); with
        `absolute`, their absolute spellings too."""
        places = [(self.args.data, "<DATA>"), (self.out, "<OUT>")]
        if absolute:
            places += [(os.path.abspath(folder), name) for folder, name in places]
        places = [(folder.rstrip(os.sep) or os.sep, name) for folder, name in places]
        return sorted(set(places), key=lambda p: -len(p[0]))

    def portable(self, obj):
        """Paths in the data and output folders written as <DATA>/... and <OUT>/..., so stage and training records
        hold no local path and stay true when a folder is moved or spelled differently."""
        return self._swap_places(obj, to_names=True)

    def local(self, obj):
        """portable() undone: <DATA> and <OUT> back to this run's folders."""
        return self._swap_places(obj, to_names=False)

    def portable_text(self, text: str) -> str:
        """portable() for free text (a command line, a log line): every path in it under DATA or OUT, spelled as
        given or absolute, named <DATA>/... and <OUT>/..."""
        for prefix, name in self._places(absolute=True):
            text = re.sub(r"(?<![^\s'\"=(])%s(?=$|[%s\s'\",)])" % (re.escape(prefix), re.escape(os.sep)), name, text)
        return text

    def _swap_places(self, obj, to_names: bool):
        def one(text: str) -> str:
            for prefix, name in self._places(absolute=to_names):
                old, new = (prefix, name) if to_names else (name, prefix)
                if text == old or text.startswith(old + os.sep):
                    return new + text[len(old):]
            return text
        return _strings(obj, one)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def forced(self, stage: str) -> bool:
        return stage in self.args.force

    def inputs(self, paths: List[str]) -> Dict[str, Optional[str]]:
        """Fingerprints of input files and folders, each computed once per run."""
        for path in paths:
            if path not in self._fingerprints:
                self._fingerprints[path] = records.fingerprint(path)
        return {p: self._fingerprints[p] for p in paths}

    def log(self, **record) -> None:
        """One JSONL line, its paths named <DATA>/... and <OUT>/... (a moved OUT's log names no old folder)."""
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            record = _strings(record, self.portable_text)
            try:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(dict(time=round(time.time(), 1), **record)) + "\n")
            except OSError as err:
                if resources.disk_full(err) is None:
                    raise
                raise UserError(resources.disk_full_line(self.log_path, "run_all's log")) from None

    def say(self, text: str, **record) -> None:
        print("== " + text, file=sys.stderr, flush=True)
        self.log(event="say", text=text, **record)

    def p1_flags(self) -> List[str]:
        """P1's model and runtime flags, for every p1_clip_zeroshot.py run (an extra stage's too)."""
        flags = ["--device", self.device, "--workers", str(self.args.workers)]
        if self.args.p1_model:
            flags += ["--model", self.args.p1_model]
        if self.args.p1_pretrained:
            flags += ["--pretrained", self.args.p1_pretrained]
        return flags

    def scoring_clip(self):
        """The CLIP of CLIPScore (--clip-model/--clip-pretrained, else clip_utils' default), loaded for a stage."""
        return clip_backend.load_clip(self.args.clip_model or clip_backend.CLIPSCORE_CLIP[0],
                                    self.args.clip_pretrained or clip_backend.CLIPSCORE_CLIP[1], self.device)

    def model_files(self) -> List[str]:
        """Local model files named on the command line (tiny CLIPs, captioners to score): inputs like the data."""
        a = self.args
        names = [a.p1_model, a.p1_pretrained, a.clip_model, a.clip_pretrained]
        if a.encoder:
            names.append(EncoderSpec.parse(a.encoder).weight_file)
        return [n for n in names if n and os.path.isfile(n)]

    def identity(self, argv: List[str]) -> List[str]:
        """A training's or a script's arguments without its RUNTIME_OPTIONS and with --device as the device type
        it runs on: what decides whether a finished training (or stage) still holds."""
        argv = without_runtime_options(argv)
        return [self.device.split(":")[0] if n and argv[n - 1] == "--device" else a for n, a in enumerate(argv)]


def without_runtime_options(argv: List[str]) -> List[str]:
    """`argv` less every RUNTIME_OPTIONS flag and its value (a record written before they were left out compares
    equal to a new one)."""
    return [a for n, a in enumerate(argv)
            if a not in RUNTIME_OPTIONS and (n == 0 or argv[n - 1] not in RUNTIME_OPTIONS)]


def steps(total: int, stage: str):
    return progress(total=total, desc="stage %s" % stage, unit="step", position=None)


# ----------------------------------------------------------------------------------------------- training

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


def option_flags(options: dict) -> List[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:  # 0 is a value (`0 in (False, None)` is true)
            flags += [flag, ",".join(str(v) for v in value) if isinstance(value, list) else str(value)]
    return flags


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


def trainer_argv(ctx: Context, train_json: str, model: List[str], options: dict) -> List[str]:
    """p2_train.py's arguments on the data folder: its captions (or `train_json`'s), the model flags, run_all's
    runtime and the shared feature cache, then the --train-config entry's options."""
    argv = ["--train-json", train_json, "--train-images", ctx.data("train_images"), "--val-json", ctx.data("val_json"),
            "--val-images", ctx.data("val_images")] + model + ["--workers", str(ctx.args.workers), "--device",
                                                               ctx.args.device]
    if ctx.args.encoder:
        argv += ["--encoder", ctx.args.encoder]
    if ctx.args.clip_model:
        argv += ["--clip-model", ctx.args.clip_model, "--clip-pretrained", ctx.args.clip_pretrained]
    if not ctx.args.no_feature_cache:
        argv += ["--feature-cache", ctx.path("p2", "feature_cache")]
    return argv + option_flags(options)


def checked_training(ctx: Context, argv: List[str], options: dict, where: str) -> argparse.Namespace:
    """p2_train.py's arguments parsed and its decoder config built (nothing loaded); one line naming `where` if not."""
    taken = sorted(k for k in options if k.replace("-", "_") in RUN_ALL_OPTIONS)
    if taken:
        raise UserError("%s: %s set by run_all.py itself (use run_all's own options)" % (where, ", ".join(taken)))
    with contextlib.redirect_stderr(io.StringIO()) as said:
        try:
            parsed = trainer.parse_args(argv)
            trainer.decoder_config(parsed)
        except SystemExit:  # argparse's error: its last line says which option and why
            lines = [line for line in said.getvalue().splitlines() if line.strip()]
            raise UserError("%s: %s" % (where, lines[-1].split(": error: ", 1)[-1] if lines else "bad option"))
        except UserError as err:
            raise UserError("%s: %s" % (where, err)) from None
    return parsed


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
    return ctx.portable(ctx.inputs([ctx.data(k) for k in STAGE_DATA["p2"]]))


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
            loop.load_state(state)
        except (UserError, RuntimeError, OSError, EOFError, ValueError) as err:
            ctx.say("%s cannot be read (%s): the interrupted training starts afresh" % (state, str(err)[:200]))
            return False
    return True


def train_run(ctx: Context, method: str, argv: List[str], inputs: dict, stage: str = "p2") -> Tuple[float, bool]:
    """One p2_train.py run into train.new, swapped in for train/ when it ends: skipped when the finished one used the
    same arguments and inputs (unless the stage is forced), resumed (--resume) when an interrupted one did, else
    started afresh. Returns its seconds (as measured then, when skipped) and whether it trained now."""
    record_argv = ctx.portable(ctx.identity(argv))
    new = run_folder(ctx, method, "new", stage)
    if ctx.rank == 0:
        restore_interrupted_swap(ctx, method, stage)
    finished = finished_training(ctx, method, record_argv, inputs, stage)
    if finished and not ctx.forced(stage):
        ctx.say("%s: %s training finished earlier with these settings and data, skipping" % (stage, method))
        return float(finished.get("seconds", 0.0)), False
    started_file = os.path.join(new, "started.json")
    resume = not ctx.forced(stage) and resumable(ctx, new, record_argv, inputs)
    if resume:
        ctx.say("%s: %s training was interrupted: resuming it (p2_train.py --resume)" % (stage, method))
    else:
        if os.path.isdir(new) and ctx.rank == 0:
            ctx.say("%s: %s: the unfinished training in %s (%s) is discarded" % (
                stage, method, new, "forced" if ctx.forced(stage) else "other settings or data"))
            shutil.rmtree(new)
        if os.path.isdir(run_folder(ctx, method, stage=stage)):
            ctx.say("%s: %s: the finished training in %s is kept until the new one ends" % (
                stage, method, run_folder(ctx, method, stage=stage)))
        if ctx.rank == 0:
            write_json(started_file, dict(argv=record_argv, inputs=inputs))
        ctx.say("%s: training %s (p2_train.py %s)" % (stage, method, " ".join(shlex.quote(a) for a in argv)))
    started = time.time()
    trainer.main(argv + ["--out", new] + (["--resume"] if resume else []))
    seconds = time.time() - started
    if ctx.rank == 0:
        portable_training_files(ctx, new)
        write_json(os.path.join(new, TRAIN_DONE), dict(argv=record_argv, inputs=inputs, seconds=round(seconds, 1),
                                                      repeatable_seconds=repeatable_seconds(new, seconds, resume),
                                                      checkpoint=checkpoint_seal(os.path.join(new, "best.pt")),
                                                      out_of_memory=[line for line in loss_log(new)
                                                                     if line.get("kind") == "out_of_memory"]))
        log_out_of_memory(ctx, new)  # the feature cache's
        os.remove(started_file)
        swap_in(ctx, method, stage)
    return seconds, True


TRAINING_JSON = ("args.json", "best.json")  # p2_train.py's files that name paths (its arguments, --init-from)


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


# ----------------------------------------------------------------------------------------------- scoring

def scored_checkpoint(ctx: Context, method: str, stage: str = "p2") -> str:
    """The checkpoint whose captions are scored: the training's best.pt, or --score-checkpoints DIR/p2_METHOD.pt
    (DIR/p2_RUN.pt for compare, DIR/p2_METHOD_scst.pt for scst; --score-students DIR/distill_SET.pt)."""
    path = scored_path(ctx, method, stage)
    option, folder = ("--score-students", ctx.args.score_students) if stage == "distill" else (
        "--score-checkpoints", ctx.args.score_checkpoints)
    if folder and not (os.path.isfile(path) and os.path.isfile(config_path(path))):
        raise UserError("%s %s has no %s with its .json" % (option, folder, os.path.basename(path)))
    return path


def scored_path(ctx: Context, method: str, stage: str = "p2") -> str:
    """scored_checkpoint's path, not checked; the compare runs' are p2_RUN.pt beside the PEFT attempts', the
    self-critical ones p2_METHOD_scst.pt."""
    folder = ctx.args.score_students if stage == "distill" else ctx.args.score_checkpoints
    if not folder:
        return os.path.join(run_folder(ctx, method, stage=stage), "best.pt")
    return os.path.join(folder, "%s_%s%s.pt" % ("distill" if stage == "distill" else "p2", method,
                                                "_scst" if stage == "scst" else ""))


def decoding_flags(settings: DecodingSettings, checkpoint: Optional[str] = None) -> List[str]:
    """Every setting as a flag (so a checkpoint's own recommendation never enters a score). With `checkpoint`,
    lengths within its decoder's positions (a small from-scratch decoder trained on short captions), which a flag
    beyond would be refused."""
    return decoding.within_positions(settings, read_checkpoint_config(checkpoint) if checkpoint else None).as_flags()


def caption_and_score(ctx: Context, checkpoint: str, settings: DecodingSettings, pred: str, clip,
                      names: Tuple[str, ...] = metrics.DEFAULT_METRICS) -> dict:
    """p2_inference.py (hw3_2.sh's code) with explicit decoding settings, then metrics.evaluate (p2_evaluate.py's
    scoring of `names`) with the CLIP loaded once. Kept as a finished part of the stage: scored again only when the
    checkpoint, the settings or the val data changed (or `pred` did), so a restart redoes only unscored rows. The
    result's "checkpoint_fingerprint" is the scored checkpoint's. Captions may reach at least the longest val
    reference and its end token (Context.scoring_max_len); the scores carry "cut" (captions that reached "max_len"
    without their end token) and that "max_len"."""
    settings = settings.replace(max_len=max(int(settings.max_len), ctx.scoring_max_len()))
    what = dict(checkpoint=checkpoint_fingerprint(checkpoint), config=records.fingerprint(config_path(checkpoint)),
                settings=decoding_flags(settings, checkpoint), metrics=list(names), split=ctx.split_flags(),
                clip=[ctx.args.clip_model, ctx.args.clip_pretrained],
                data=ctx.inputs([ctx.data(k) for k in ("val_json", "val_images", "decoder")] + ctx.model_files()))

    def score() -> dict:
        captioned = predict.run([ctx.data("val_images"), pred, ctx.data("decoder"), "--checkpoint", checkpoint,
                                      "--device", ctx.args.device, "--num-workers", str(ctx.args.workers)]
                                     + ctx.split_flags() + decoding_flags(settings, checkpoint))
        scores = metrics.evaluate(read_json(pred), ctx.data("val_json"), ctx.data("val_images"),
                                  metrics.Scoring(clip=clip, device=ctx.device, metrics=names), split=ctx.val_split())
        log_out_of_memory(ctx, checkpoint)
        return dict(scores, cut=captioned["cut"], max_len=captioned["max_len"],
                    checkpoint_fingerprint=what["checkpoint"])
    return kept_part(ctx, "scoring %s" % os.path.relpath(pred, ctx.out), what, [pred], score)


def log_out_of_memory(ctx: Context, during: str) -> None:
    """The batch halvings after CUDA out-of-memory errors (resources.EVENTS) into run_all.log."""
    while resources.EVENTS:
        ctx.log(event="out of memory", during=ctx.portable(during), **resources.EVENTS.pop(0))


def checkpoint_fingerprint(path: str) -> str:
    """A checkpoint's content hash (its size and time would differ in every copy of the committed checkpoints)."""
    return "sha256:" + file_sha256(path)[:32]


def kept_part(ctx: Context, name: str, what: dict, files: List[str], make: Callable[[], object]):
    """A finished part of the running stage (`make()`'s JSON result and the files it wrote), kept in
    OUT/stages/parts/ with the fingerprints of what made it (`what`): returned again without `make` while they and
    the files are unchanged, unless the stage is forced. A record that cannot be read is not a finished part."""
    path = ctx.path(*PARTS, re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".json")
    what = json.loads(json.dumps(ctx.portable(what)))
    if not ctx.forced(ctx.stage or ""):
        done = readable_json(path, "finished part")
        if isinstance(done, dict) and done.get("what") == what and done.get("files") == ctx.portable(
                records.fingerprints(files)) and "result" in done:
            ctx.say("%s: %s: done earlier and still true, kept" % (ctx.stage, name))
            return ctx.local(done["result"])
    result = make()
    write_json(path, dict(what=what, files=ctx.portable(records.fingerprints(files)), result=ctx.portable(result)),
               indent=None)
    return result


def cut_lines(rows: Dict[str, dict], what: str) -> List[str]:
    """results.md's word on cut captions: a line for each scored row some of whose captions reached the length
    limit without their end token (their scores are those of cut captions)."""
    return ["- %s %s: %d captions cut at %d tokens (no end token; their scores are of cut captions)"
            % (what, name, row["cut"], row["max_len"]) for name, row in rows.items() if row.get("cut")]


def shipped_cut(ctx: Context) -> Dict[str, Optional[int]]:
    """"cut" and "max_len" of p2_best's val captions with the shipped decoding (its row of the decoding table)."""
    chosen = setting_name(ctx.results["p2_inference"])
    row = next((r for r in ctx.results.get("p2_decoding") or [] if setting_name(r) == chosen), {})
    return dict(cut=row.get("cut"), max_len=row.get("max_len"))


def setting_name(settings: dict) -> str:
    if settings["method"] == "greedy":
        return "greedy"
    if settings["method"] == "sample":
        return "sample_t%g" % settings["temperature"]
    return "beam%d_lp%g" % (settings["beam_size"], settings["length_penalty"])


def ship(ctx: Context, checkpoint: str, chosen: dict, dest: Optional[str] = None) -> dict:
    """OUT/p2/p2_best.{pt,json} (or `dest`): the best checkpoint with its chosen decoding under "inference" (checked
    as hw3_2.sh will read it), and what RELEASE in hw3_download.py needs."""
    dest = dest or ctx.path("p2", "p2_best.pt")
    with atomic_write(dest, "wb") as f, open(checkpoint, "rb") as src:
        shutil.copyfileobj(src, f)
    meta = dict(ctx.portable(read_checkpoint_config(checkpoint)), **{decoding.INFERENCE_KEY: chosen})
    decoding.resolve_decoding({}, meta, config_path(dest))  # raises if hw3_2.sh could not use it
    write_json(config_path(dest), meta)
    return dict(checkpoint=dest, config=config_path(dest), sha256=file_sha256(dest), bytes=os.path.getsize(dest))


def shipped_predictions(ctx: Context) -> str:
    """p2_best's val captions with its shipped decoding, as the p2 stage wrote them."""
    chosen, best = ctx.results["p2_inference"], ctx.results["p2_best"]
    if setting_name(chosen) == setting_name(dict(decoding.DECODE_DEFAULTS, **DECODING_GRID[0])):
        return ctx.path("p2", best, "pred.json")
    return ctx.path("p2", "decoding", setting_name(chosen) + ".json")
