"""What every run_all.py stage uses: the run's Context (arguments, paths, device, results so far, the log), and the
two calls a stage makes of the scripts: a p2_train.py run (trainings.py has its folders and records) and the scoring of
a checkpoint's val captions with explicit decoding settings (scoring.py has its parts).

It calls the scripts' main() functions in this process (p2_train, p2_inference), so every number comes from the code
a student would run by hand.
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
from hw3.training import cli, trainer
from hw3.pipeline import records
from hw3.util import resources
from hw3.models import registry, decoding
from hw3.training.config import TrainingConfig, to_argv
from hw3.models.captioner import config_path, read_checkpoint_config
from hw3.pipeline.layout import DATA
from hw3.pipeline.scoring import checkpoint_fingerprint, kept_part, log_out_of_memory
from hw3.pipeline.trainings import (TRAIN_DONE, checkpoint_seal, finished_training, loss_log, portable_training_files,
                                    repeatable_seconds, restore_interrupted_swap, resumable, run_folder, swap_in,
                                    without_runtime_options)
from hw3.util.device import resolve_device
from hw3.util.errors import UserError, progress
from hw3.util.files import read_json, write_json
from hw3.models.decoding import DecodingSettings
from hw3.models.encoder import EncoderSpec
from hw3.data.tokenizer import shared_tokenizer
from hw3.models.output_vocab import captions_output_ids

# Decoding settings tried on the best attempt; the README default comes first, so a tie keeps it. Every stage reads
# it as context.DECODING_GRID (no copy by `from ... import`), so one assignment changes it for all.
DECODING_GRID = (dict(method="beam", beam_size=3, length_penalty=1.0), dict(method="greedy", beam_size=1),
                 dict(method="beam", beam_size=5, length_penalty=1.0), dict(method="beam", beam_size=3, length_penalty=0.6),
                 dict(method="beam", beam_size=5, length_penalty=1.4))
# p2_train.py options that run_all sets itself, so a --train-config entry may not.
RUN_ALL_OPTIONS = ("arch", "train_json", "train_images", "val_json", "val_images", "decoder_weights", "peft", "out",
                   "resume", "feature_cache", "device", "workers", "encoder", "clip_model", "clip_pretrained")


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
        # each opt-in stage's trainings' parsed options as its check read them (stage -> training -> options): the
        # disk estimate sizes those trainings from their own models
        self.stage_options: Dict[str, Dict[str, argparse.Namespace]] = {}
        self._fingerprints: Dict[str, Optional[str]] = {}
        self.stage: Optional[str] = None  # the stage running now: its --force redoes its kept parts too
        self._scoring_max_len: Optional[int] = None
        self._train_output_ids: Optional[Tuple[int, ...]] = None

    def data(self, key: str) -> str:
        if self.args.captions:  # another dataset: one caption file, one image folder, split by caption_files' rules
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
        below the README's 30 (search.covering_max_len; the decoder's positions cap it in search)."""
        if self._scoring_max_len is None:
            val = caption_files.load_captions(self.data("val_json"), self.data("val_images"), split=self.val_split(),
                                        default_split="val")
            _, _, longest = datasets.tokenize_captions(val.references, shared_tokenizer(), sys.maxsize)
            self._scoring_max_len = decoding.covering_max_len(longest)
        return self._scoring_max_len

    def train_output_ids(self) -> Tuple[int, ...]:
        """The GPT-2 ids of the training captions, uncut: the compact output layer of a from-scratch decoder trained
        on them (the disk estimate sizes every from-scratch training so, a distill student's too, whose teacher's
        captions hold about as many)."""
        if self._train_output_ids is None:
            train = caption_files.load_captions(self.data("train_json"), self.data("train_images"),
                                                split="train" if self.args.captions else None, default_split="train")
            self._train_output_ids = captions_output_ids(train.captions, sys.maxsize)
        return self._train_output_ids

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
        """The CLIP of CLIPScore (--clip-model/--clip-pretrained, else clip_backend's default), loaded for a stage."""
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


def steps(total: int, stage: str):
    return progress(total=total, desc="stage %s" % stage, unit="step", position=None)


# ----------------------------------------------------------------------------------------------- training

def training_config(ctx: Context, train_json: str, model: dict, options: dict) -> TrainingConfig:
    """A training on the data folder: its captions (or `train_json`'s), the model options, run_all's runtime and the
    shared feature cache, then the --train-config entry's options (in that order: the recorded command's)."""
    given = dict(train_json=train_json, train_images=ctx.data("train_images"), val_json=ctx.data("val_json"),
                 val_images=ctx.data("val_images"))
    given.update(model)
    given.update(workers=ctx.args.workers, device=ctx.args.device)
    if ctx.args.encoder:
        given["encoder"] = ctx.args.encoder
    if ctx.args.clip_model:
        given.update(clip_model=ctx.args.clip_model, clip_pretrained=ctx.args.clip_pretrained)
    if not ctx.args.no_feature_cache:
        given["feature_cache"] = ctx.path("p2", "feature_cache")
    return TrainingConfig.from_options(dict(given, **options))


def checked_training(ctx: Context, config: TrainingConfig, options: dict, where: str) -> argparse.Namespace:
    """The training's options through p2_train.py's parser and its decoder config built (nothing loaded), as the
    trainer's settings; one line naming `where` if not."""
    taken = sorted(k for k in options if k.replace("-", "_") in RUN_ALL_OPTIONS)
    if taken:
        raise UserError("%s: %s set by run_all.py itself (use run_all's own options)" % (where, ", ".join(taken)))
    with contextlib.redirect_stderr(io.StringIO()) as said:
        try:
            parsed = cli.command_settings(cli.parse_config(to_argv(config)))
            registry.config_from_args(parsed)
        except SystemExit:  # argparse's error: its last line says which option and why
            lines = [line for line in said.getvalue().splitlines() if line.strip()]
            raise UserError("%s: %s" % (where, lines[-1].split(": error: ", 1)[-1] if lines else "bad option"))
        except UserError as err:
            raise UserError("%s: %s" % (where, err)) from None
    return parsed


def train_run(ctx: Context, method: str, config: TrainingConfig, inputs: dict,
              stage: str = "p2") -> Tuple[float, bool]:
    """One p2_train.py run into train.new, swapped in for train/ when it ends: skipped when the finished one used the
    same arguments and inputs (unless the stage is forced), resumed (--resume) when an interrupted one did, else
    started afresh. Returns its seconds (as measured then, when skipped) and whether it trained now."""
    argv = to_argv(config)
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
    trainer.train(config.replace(out=new, resume=resume))
    seconds = time.time() - started
    if ctx.rank == 0:
        portable_training_files(ctx, new)
        write_json(os.path.join(new, TRAIN_DONE), dict(argv=record_argv, inputs=inputs, seconds=round(seconds, 1),
                                                      repeatable_seconds=repeatable_seconds(new, seconds, resume),
                                                      checkpoint=checkpoint_seal(os.path.join(new, "best.pt")),
                                                      out_of_memory=[line for line in loss_log(new)
                                                                     if line.get("kind") == "out_of_memory"]))
        log_out_of_memory(ctx, new)  # the feature cache's
        drop_resume_state(new)
        os.remove(started_file)
        swap_in(ctx, method, stage)
    return seconds, True


def drop_resume_state(folder: str) -> None:
    """A finished training's last_state.pt (its weights and Adam's moments, three times best.pt): run_all never
    resumes a finished training (other settings or data train afresh), so the state only takes disk."""
    state = os.path.join(folder, "last_state.pt")
    if os.path.isfile(state):
        os.remove(state)


# ----------------------------------------------------------------------------------------------- scoring

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
