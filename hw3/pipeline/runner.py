"""The stage runner: a stage runs, or is skipped while its record in OUT/stages/ is still true (its settings and the
fingerprints of its inputs, the earlier stages' outputs it reads among them, unchanged), and its record is written when
it ends."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

from hw3.models.captioner import config_path
from hw3.pipeline import context, plan, records
from hw3.pipeline.context import Context, merge
from hw3.pipeline.scoring import scored_checkpoint
from hw3.pipeline.stage_table import CORE_STAGES, TABLE, declared_upstream, stage_data
from hw3.pipeline.stages.p2 import train_argv
from hw3.pipeline.trainings import discard_unfinished_trainings
from hw3.report import answer_file
from hw3.training.config import to_argv
from hw3.util.errors import UserError


def stage_settings(ctx: Context, stage: str) -> dict:
    """What a stage's results depend on besides its input files: a finished stage whose settings, inputs and
    outputs are unchanged is skipped."""
    a = ctx.args
    if stage == "p1":
        return dict(flags=ctx.identity(ctx.p1_flags()))
    if stage == "p2":
        return dict(train=[ctx.identity(to_argv(train_argv(ctx, m, ""))) for m in a.methods],
                    train_max_images=a.train_max_images,
                    score_checkpoints=a.score_checkpoints, grid=context.DECODING_GRID)
    if stage == "p3":
        return dict(shipped=ctx.results.get("p2_shipping"), inference=ctx.results.get("p2_inference"))
    if stage in TABLE:
        return TABLE[stage].settings(ctx)
    upstream = {k: v for k, v in ctx.results.items() if k not in ("timings",)}  # the report and extra stages
    answers = {k: v for k, v in answer_file.read(ctx.out).items() if v} if stage == "report" else {}
    return dict(upstream=records.digest(ctx.portable(upstream)), stage=stage,
                student_id=a.student_id if stage == "report" else None,
                **({"answers": records.digest(answers)} if answers else {}))  # an edited answer rebuilds the report


def stage_inputs(ctx: Context, stage: str) -> Dict[str, Optional[str]]:
    """Fingerprints of what the stage reads: data named by their place in --data (<DATA>/p2_data/val.json), model
    files as given."""
    paths = [ctx.data(k) for k in stage_data(stage)]
    if stage != "report":
        paths += ctx.model_files()
    if stage == "p2" and ctx.args.score_checkpoints:
        paths += [p for m in ctx.args.methods for p in (scored_checkpoint(ctx, m),
                                                         config_path(scored_checkpoint(ctx, m)))]
    if stage in TABLE:
        paths += [p for c in TABLE[stage].scored(ctx) for p in (c, config_path(c))]
    if stage not in CORE_STAGES and stage not in TABLE:  # an extra stage reads the data folder its own way
        paths.append(ctx.args.data)
    paths += upstream_files(ctx, stage)
    return dict(ctx.portable(ctx.inputs(paths)), **upstream_outputs(ctx, stage))


def upstream_outputs(ctx: Context, stage: str) -> Dict[str, Optional[str]]:
    """The outputs of the earlier stages this one reads, with the fingerprints their records hold (each checked by
    its own stage before this one runs), named <OUT>/...: a stage whose upstream changed is redone. The report and
    extra stages read every stage before them."""
    earlier = declared_upstream(ctx, stage)
    if stage == "report" or not (stage in CORE_STAGES or stage in TABLE):
        names = [s[0] for s in plan.stage_list(ctx)]
        earlier = tuple(names[:names.index(stage)]) if stage in names else ()
    outputs = {}
    for name in earlier:
        try:
            record = records.read_record(ctx.out, name)
        except UserError:  # a damaged record: its own stage says so
            record = None
        if record and isinstance(record.get("outputs"), dict):
            outputs.update({"<OUT>/" + path: value for path, value in record["outputs"].items()})
    return outputs


def upstream_files(ctx: Context, stage: str) -> List[str]:
    """Files of earlier stages a stage reads besides their recorded outputs: the checkpoint (with its JSON) that P3
    uses, those an opt-in stage's row names (each may be a --score-checkpoints one); for the report and extra stages,
    every file the results so far name."""
    checkpoints = []
    if stage == "p3" and ctx.results.get("p2_shipping"):
        checkpoints.append(ctx.results["p2_shipping"]["checkpoint"])
    if stage in TABLE:
        checkpoints += TABLE[stage].reads(ctx)
    if stage not in CORE_STAGES and stage not in TABLE or stage == "report":
        checkpoints += named_files(ctx.results)
    return sorted({p for c in checkpoints for p in (c, config_path(c)) if os.path.isfile(p)})


def named_files(obj) -> List[str]:
    """The existing files a results fragment names, at any depth."""
    if isinstance(obj, str):
        return [obj] if os.path.isfile(obj) else []
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [p for v in values for p in named_files(v)]


def run_stage(ctx: Context, name: str, function, selected: bool) -> None:
    record = records.read_record(ctx.out, name)
    settings = json.loads(json.dumps(ctx.portable(stage_settings(ctx, name))))
    inputs = stage_inputs(ctx, name)
    why = records.why_rerun(record, ctx.out, settings, inputs)
    if not selected:
        if record and why is None:
            merge(ctx.results, ctx.local(record["results"]))
        elif record:
            ctx.say("%s: not selected; its earlier results are left out (%s)" % (name, why), stage=name)
        return
    if why is None and not ctx.forced(name):
        ctx.say("%s: %s, skipping" % (name, records.skip_line(record)), stage=name, skipped=True)
        merge(ctx.results, ctx.local(record["results"]))
        if name == "p2":
            discard_unfinished_trainings(ctx)
        if name in TABLE:
            trainings = TABLE[name].trainings
            discard_unfinished_trainings(ctx, name, None if trainings is None else list(trainings))
        return
    if ctx.forced(name):
        why = "forced (--force %s): redone from its start%s" % (
            name, "; the earlier outputs stay until the new ones are written" if record else "")
    ctx.say("%s: %s" % (name, "starting" if record is None else "running again: " + why), stage=name)
    ctx.stage = name
    started = time.time()
    fragment = function(ctx) or {}
    seconds = round(time.time() - started, 1)
    outputs = list(fragment.pop("outputs", [])) + list((fragment.get("files") or {}).values())
    merge(fragment, dict(timings=dict(stages={name: seconds})))
    merge(ctx.results, fragment)
    records.write_record(ctx.out, name, settings, inputs, sorted(set(outputs)), seconds, ctx.portable(fragment))
    ctx.log(event="stage done", stage=name, seconds=seconds)
    ctx.say("%s: done in %.0f s" % (name, seconds))


def check_upstream_results(ctx: Context, name: str, names: List[str]) -> None:
    """Before `name` runs: the earlier stages it reads have results that are still true (P2's best captioner; an
    opt-in stage's), else one line naming the stage to add to --only."""
    for earlier in declared_upstream(ctx, name):
        if earlier == "p2" and "p2" in names and "p2_shipping" not in ctx.results:
            raise UserError("%s uses P2's best captioner, but %s has no finished p2 stage that is still true: "
                            "add p2 to --only" % (name, ctx.out))
        if earlier in TABLE and earlier not in ctx.results:
            raise UserError(TABLE[earlier].needed_by(name, ctx.out, "that is still true"))
