"""Scoring a checkpoint's val captions as a finished part of a stage: which checkpoint is scored (a training's best.pt
or a committed one), the parts kept in OUT/stages/parts/ while what made them is unchanged, and the words results.md
uses for a scored row (its decoding's name, its cut captions). context.caption_and_score is built from these."""
from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Callable, Dict, List

from hw3.models.captioner import config_path
from hw3.pipeline import records
from hw3.pipeline.trainings import readable_json, run_folder
from hw3.util import resources
from hw3.util.errors import UserError
from hw3.util.files import file_sha256, write_json

if TYPE_CHECKING:
    from hw3.pipeline.context import Context

PARTS = ("stages", "parts")  # OUT/stages/parts/: a stage's finished parts (teacher captions, scored rows)


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


def setting_name(settings: dict) -> str:
    if settings["method"] == "greedy":
        return "greedy"
    if settings["method"] == "sample":
        return "sample_t%g" % settings["temperature"]
    return "beam%d_lp%g" % (settings["beam_size"], settings["length_penalty"])
