"""The p2 stage: each PEFT attempt trained (one shared feature cache; an interrupted training resumes), scored on val
(CIDEr, CLIPScore, trainable parameters, time), the best by CIDEr, its decoding tuned on val, and the shippable
checkpoint OUT/p2/p2_best.{pt,json} with the chosen decoding under "inference"."""
from __future__ import annotations

import os
import time
from typing import List, Tuple

from hw3.models import decoding
from hw3.models.captioner import read_checkpoint_config
from hw3.models.decoding import DecodingSettings
from hw3.pipeline import context
from hw3.pipeline.context import Context, caption_and_score, steps, train_run, training_config
from hw3.pipeline.layout import DATA
from hw3.pipeline.scoring import scored_checkpoint, setting_name
from hw3.pipeline.shipping import ship
from hw3.pipeline.trainings import TRAIN_DONE, TRAINING_RECORD, loss_log, run_folder, train_config, train_inputs, \
    train_split
from hw3.models.registry import PEFT_OPTIONS
from hw3.training.config import TrainingConfig
from hw3.util.files import atomic_write, read_json, write_json

METHODS = ("adapter", "prefix", "lora")  # the report's three PEFT attempts


def train_argv(ctx: Context, method: str, train_json: str) -> TrainingConfig:
    """p2_train.py's arguments for one attempt, without --out (the folder it trains in is run_all's choice)."""
    model = dict(decoder_weights=ctx.data("decoder"), peft=method)
    return training_config(ctx, train_json, model, train_config(ctx).get(method, {}))


def train_method(ctx: Context, method: str, train_json: str) -> Tuple[float, bool]:
    """One PEFT attempt of the p2 stage (train_run)."""
    return train_run(ctx, method, train_argv(ctx, method, train_json), train_inputs(ctx))


def estimate_rest(ctx: Context, method: str, seconds: float, rest: List[str]) -> str:
    """'about N s more for the other attempts', from the repeatable part of the first one, scaled by epochs."""
    record = read_json(os.path.join(run_folder(ctx, method), TRAIN_DONE), "training record")
    repeatable = record.get("repeatable_seconds")
    per_epoch = (repeatable if repeatable is not None else seconds) / max(1, ctx.train_options[method].epochs)
    more = sum(per_epoch * ctx.train_options[m].epochs for m in rest)
    return "p2: %s took %.0f s (%s): about %.0f s more for the other %d attempt(s)" % (
        method, seconds, "%.0f s of it repeated by every attempt, the rest filling the feature cache" % repeatable
        if repeatable is not None else "no one-off part measured", more, len(rest))


def loss_curve(ctx: Context, method: str) -> List[List[float]]:
    return [[line["step"], line["loss"]] for line in loss_log(run_folder(ctx, method))
            if "loss" in line and "step" in line]


def plot_curves(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=method)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title("p2_train.py runs")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def active_settings(ctx: Context, method: str, checkpoint: str, meta: dict) -> dict:
    """What the report's "best setting" lists: the method's own PEFT options (as the checkpoint was built), and the
    training's learning rate, epochs and batch size: this run's when it trained the scored checkpoint, else those
    the checkpoint's JSON records (the world's committed checkpoints do)."""
    row = dict(peft={k: meta["decoder"].get(k) for k in PEFT_OPTIONS.get(method, ())})
    args_file = os.path.join(os.path.dirname(checkpoint), "args.json")
    if not ctx.args.score_checkpoints and os.path.isfile(args_file):
        trained = read_json(args_file, "training arguments")
        row["training"] = {k: trained.get(k) for k in TRAINING_RECORD}
    elif isinstance(meta.get("training"), dict):
        row["training"] = dict(meta["training"])
    if "training" in row and "epoch" in meta:
        row["training"]["best_epoch"] = meta["epoch"]
    return row


def stage_p2(ctx: Context) -> dict:
    methods = ctx.args.methods
    grid = [dict(decoding.DECODE_DEFAULTS, **g) for g in context.DECODING_GRID]
    grid = [dict(g, max_len=max(g["max_len"], ctx.scoring_max_len())) for g in grid]  # covers the references
    with steps(3 * len(methods) + len(grid) - 1, "p2") as bar:
        train_json = train_split(ctx)
        train_seconds, estimated = {}, False
        for n, method in enumerate(methods):
            seconds, trained = train_method(ctx, method, train_json)
            train_seconds[method] = round(seconds, 1)
            bar.update(2)
            if trained and n < len(methods) - 1 and not estimated:
                ctx.say(estimate_rest(ctx, method, seconds, methods[n + 1:]))
                estimated = True
        curves = {m: loss_curve(ctx, m) for m in methods}
        plot_curves(curves, ctx.path("p2", "loss_curves.png"))
        clip = ctx.scoring_clip()
        rows, eval_seconds = {}, {}
        for method in methods:
            started = time.time()
            checkpoint = scored_checkpoint(ctx, method)
            ctx.say("p2: scoring %s (%s) on val" % (method, checkpoint))
            scored = caption_and_score(ctx, checkpoint, DecodingSettings.from_record(grid[0]),
                                       ctx.path("p2", method, "pred.json"), clip)
            write_json(ctx.path("p2", method, "per_image.json"), scored["per_image"])
            meta = read_checkpoint_config(checkpoint)
            rows[method] = dict(cider=scored["CIDEr"], clipscore=scored["CLIPScore"], cut=scored["cut"],
                                max_len=scored["max_len"],
                                trainable_params=meta["trainable_parameters"], checkpoint=checkpoint,
                                checkpoint_fingerprint=scored["checkpoint_fingerprint"],
                                **active_settings(ctx, method, checkpoint, meta))
            eval_seconds[method] = round(time.time() - started, 1)
            bar.update(1)
        best = max(methods, key=lambda m: rows[m]["cider"])
        started = time.time()
        table, chosen = tune_decoding(ctx, best, rows[best], grid, clip, bar)
        decoding_seconds = round(time.time() - started, 1)
        shipping = ship(ctx, rows[best]["checkpoint"], chosen)
    outputs = ["p2/loss_curves.png", "p2/p2_best.pt", "p2/p2_best.json", "p2/p2_best.per_image.json"]
    outputs += [os.path.join("p2", m, name) for m in methods for name in ("pred.json", "per_image.json")]
    outputs += [os.path.join("p2", "decoding", setting_name(g) + ".json") for g in grid[1:]]  # scst, distill read them
    outputs += [os.path.relpath(os.path.join(run_folder(ctx, m), name), ctx.out) for m in methods
                for name in ("best.pt", TRAIN_DONE, "log.jsonl")]
    return dict(p2=rows, p2_best=best, p2_train_loss={m: [c[0][1], c[-1][1]] if c else None for m, c in curves.items()},
                p2_decoding=table, p2_inference=chosen, p2_shipping=shipping,
                timings=dict(p2_train=train_seconds, p2_evaluate=eval_seconds, p2_decoding=decoding_seconds),
                files=dict(p2_loss_curves="p2/loss_curves.png"), outputs=outputs)


def tune_decoding(ctx: Context, method: str, row: dict, grid: List[dict], clip, bar):
    """Each decoding setting of the grid on val with the best attempt; the highest CIDEr wins (ties keep the
    earlier, the README default first). Returns the table and the chosen settings with "chosen_on" (the split named
    by its place in the data folder: the file is committed, so it holds no local path)."""
    table, per_image = [], {}
    for n, settings in enumerate(grid):
        name = setting_name(settings)
        if n == 0:  # the README default: the attempt's own row
            scores = dict(CIDEr=row["cider"], CLIPScore=row["clipscore"], cut=row["cut"], max_len=row["max_len"])
            per_image[name] = None
        else:
            ctx.say("p2: decoding %s" % name)
            scores = caption_and_score(ctx, row["checkpoint"], DecodingSettings.from_record(settings),
                                       ctx.path("p2", "decoding", name + ".json"), clip)
            per_image[name] = scores["per_image"]
            bar.update(1)
        table.append(dict(settings, cider=scores["CIDEr"], clipscore=scores["CLIPScore"], cut=scores["cut"],
                          max_len=scores["max_len"]))
    best = max(range(len(table)), key=lambda i: (table[i]["cider"], -i))
    chosen = {k: table[best][k] for k in decoding.DECODE_DEFAULTS}
    chosen["chosen_on"] = "highest CIDEr on the val split (%s, %d images) among %d settings (run_all.py)" % (
        "%s, its val split" % os.path.basename(ctx.args.captions) if ctx.args.captions else DATA["val_json"],
        len(read_json(ctx.path("p2", method, "pred.json"))), len(grid))
    scores = per_image[setting_name(chosen)]
    if scores is None:
        scores = read_json(ctx.path("p2", method, "per_image.json"))
    write_json(ctx.path("p2", "p2_best.per_image.json"), scores)
    return table, chosen
