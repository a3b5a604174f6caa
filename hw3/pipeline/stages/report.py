"""The report stage: results.json (with the command and where every number comes from), results.md and the report
PDF (make_report.py's build)."""
from __future__ import annotations

import importlib
import platform
import shlex
import subprocess
import time

from hw3 import REPO_ROOT
from hw3.pipeline.context import Context, steps
from hw3.pipeline.results_md import results_table
from hw3.report import compose
from hw3.util.files import atomic_write, write_json


def source_block(ctx: Context) -> dict:
    """Where every number of the report comes from: data, command, date, machine, library versions, commit."""
    import torch

    versions = dict(python=platform.python_version(), torch=torch.__version__)
    for name, module in (("timm", "timm"), ("open_clip", "open_clip")):
        try:
            versions[name] = getattr(importlib.import_module(module), "__version__", "installed")
        except ImportError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if ctx.device.startswith("cuda") else None
    try:
        commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = commit and subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return dict(data=ctx.args.data, command=command(ctx), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                device=ctx.device, gpu=gpu, versions=versions,
                git_commit=(commit + (" (with uncommitted changes)" if dirty else "")) if commit else None)


def report_name(ctx: Context) -> str:
    """hw3_<ID>.pdf as the course asks when --student-id is given, else report.pdf."""
    return "hw3_%s.pdf" % ctx.args.student_id if ctx.args.student_id else "report.pdf"


def stage_report(ctx: Context) -> dict:
    results = dict(ctx.results, command=command(ctx))
    note = results.get("source")  # an extra stage's words on the data (the demo's world)
    results["source"] = dict(source_block(ctx), **({"note": note} if isinstance(note, str) else note or {}))
    results["seconds"] = round(sum(((results.get("timings") or {}).get("stages") or {}).values()), 1)
    results = ctx.portable(dict(results, command=ctx.portable_text(results["command"]), source=dict(
        results["source"], command=ctx.portable_text(results["source"]["command"]))))  # OUT moves whole
    with steps(1, "report") as bar:
        write_json(ctx.path("results.json"), results)
        table = results_table(results)
        with atomic_write(ctx.path("results.md")) as f:
            f.write(table)
        compose.build(ctx.out, ctx.path(report_name(ctx)), student_id=ctx.args.student_id)
        bar.update(1)
    print(table)
    return dict(outputs=["results.json", "results.md", report_name(ctx), compose.MARKDOWN_NAME])


def command(ctx: Context) -> str:
    return "python3 run_all.py " + " ".join(shlex.quote(a) for a in ctx.argv)
