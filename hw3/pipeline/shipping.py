"""The shippable captioner: p2_best.{pt,json} with its chosen decoding as hw3_2.sh reads it, where its val captions
are, and --install's copy into checkpoints/."""
from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

from hw3 import REPO_ROOT
from hw3.models import decoding
from hw3.models.captioner import config_path, read_checkpoint_config
from hw3.pipeline import context
from hw3.pipeline.context import Context
from hw3.pipeline.scoring import setting_name
from hw3.util.errors import UserError
from hw3.util.files import atomic_write, file_sha256, write_json

SHIP = ("checkpoints", "p2_best.pt")  # where hw3_2.sh looks, relative to the repository


def ship(ctx: Context, checkpoint: str, chosen: dict, dest: Optional[str] = None) -> dict:
    """OUT/p2/p2_best.{pt,json} (or `dest`): the best checkpoint with its chosen decoding under "inference" (checked
    as hw3_2.sh will read it), and what RELEASE in hw3/models/downloads.py needs."""
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
    if setting_name(chosen) == setting_name(dict(decoding.DECODE_DEFAULTS, **context.DECODING_GRID[0])):
        return ctx.path("p2", best, "pred.json")
    return ctx.path("p2", "decoding", setting_name(chosen) + ".json")


def shipped_cut(ctx: Context) -> Dict[str, Optional[int]]:
    """"cut" and "max_len" of p2_best's val captions with the shipped decoding (its row of the decoding table)."""
    chosen = setting_name(ctx.results["p2_inference"])
    row = next((r for r in ctx.results.get("p2_decoding") or [] if setting_name(r) == chosen), {})
    return dict(cut=row.get("cut"), max_len=row.get("max_len"))


def install(ctx: Context) -> None:
    shipping = ctx.results.get("p2_shipping")
    if not shipping:
        raise UserError("--install needs P2's results in %s: run the p2 stage first" % ctx.out)
    for path in (shipping["checkpoint"], shipping["config"]):
        if not os.path.isfile(path):
            raise UserError("--install: %s is missing; run the p2 stage again (drop --only, or add p2 to it)" % path)
    dest = os.path.join(REPO_ROOT, *SHIP)
    for src, dst in ((shipping["checkpoint"], dest), (shipping["config"], config_path(dest))):
        with atomic_write(dst, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    print("installed %s and %s" % (os.path.relpath(dest), os.path.relpath(config_path(dest))))


def shipping_note(shipping: dict) -> str:
    dest = os.path.join(*SHIP)
    return ("to ship the best captioner: copy %s -> %s and %s -> %s (or rerun with --install); or upload "
            "p2_best.pt, commit its JSON as %s and set RELEASE in hw3/models/downloads.py: sha256=%r, bytes=%d"
            % (shipping["checkpoint"], dest, shipping["config"], config_path(dest), config_path(dest),
               shipping["sha256"], shipping["bytes"]))
