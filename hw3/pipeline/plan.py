"""The run's plan: its stages in running order with a line on each (the opt-in ones from their rows in the stage
table, then the extra stages, then the report), and the plan printed before any work with the device, the disk and
the memory it needs."""
from __future__ import annotations

import importlib
import sys
from typing import Callable, List

from hw3.pipeline import records
from hw3.pipeline.context import Context
from hw3.pipeline.stage_table import TABLE, running_order
from hw3.pipeline.stages import p1, p2, p3, report
from hw3.util import resources
from hw3.util.errors import UserError

ABOUT = dict(p1="zero-shot on p1_data/val: accuracy, the report's three prompts + the ensemble, top-5 figure",
             p2="train %s, score each on val (CIDEr, CLIPScore, parameters, time), tune the best one's decoding, "
                "write OUT/p2/p2_best.{pt,json}",
             p3="attention figures of p3_data/images and of the best/worst val captions by CLIPScore",
             report="results.json, results.md, the report PDF")


def extra_stage(spec: str) -> Callable[[Context], dict]:
    """--extra-stage module:function -> the function (called with the Context; returns results to merge, and may
    name the files it wrote under "outputs", relative to OUT)."""
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError("--extra-stage %s: no function %r in module %r (%s)" % (spec, name, module, err)) from None
    return function


def stage_list(ctx: Context) -> List[tuple]:
    """(name, function, description) in running order; the opted-in stages (--with), then the extra stages, before
    the report."""
    stages = [("p1", p1.stage_p1, ABOUT["p1"]), ("p2", p2.stage_p2, ABOUT["p2"] % ", ".join(ctx.args.methods)),
              ("p3", p3.stage_p3, ABOUT["p3"])]
    stages += [(name, TABLE[name].run, TABLE[name].about(ctx)) for name in running_order(ctx, ctx.args.with_stages)]
    if ctx.args.captions:  # another dataset: no P1 or P3 data; P2 needs the GPT-2 weights
        stages = [s for s in stages if s[0] not in ("p1", "p3") and (s[0] != "p2" or ctx.args.decoder_weights)]
    for spec in ctx.args.extra_stage:
        function = extra_stage(spec)
        stages.append((spec, function, (function.__doc__ or "").strip().split("\n")[0]))
    return stages + [("report", report.stage_report, ABOUT["report"])]


def gpu_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU found: running on the CPU (fine for the miniature world; hw3_data needs a GPU)"
    props = torch.cuda.get_device_properties(0)
    return "GPU: %s, %.1f GB (%d visible); fp16 autocast on" % (props.name, props.total_memory / 2 ** 30,
                                                              torch.cuda.device_count())


def print_plan(ctx: Context, stages: List[tuple], selected: List[str]) -> None:
    lines = ["plan (%s -> %s):" % (ctx.args.data, ctx.out)]
    for name, _, about in stages:
        record = records.read_record(ctx.out, name)
        state = "not selected" if name not in selected else ("forced: redone" if ctx.forced(name) else (
            "to run" if not record else "record damaged: redone" if "damaged" in record else
            "finished earlier: skipped if still true"))
        lines.append("  %-8s %s [%s]" % (name, about, state))
    lines.append("  %s; log: %s" % (gpu_line(), ctx.log_path))
    lines += ["  " + line for line in resources.plan_lines(ctx, selected)]  # refuses a disk that is short
    lines.append("  time: each stage's is measured and printed; P2's remaining training is estimated after the "
                 "first attempt (README 'Your GPU day' has the RTX 2080 Ti estimate)")
    print("\n".join(lines), file=sys.stderr, flush=True)
    ctx.log(event="plan", command=report.command(ctx), stages=[s[0] for s in stages], selected=selected)
