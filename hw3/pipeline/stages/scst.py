"""The scst stage (run_all.py --with scst): self-critical fine-tuning of P2's best attempt (p2_train.py --init-from
its checkpoint --scst-epochs N), scored before and after with the shipped decoding ("scst"); without the GPT-2, of the
compare stage's best architecture, scored with the compare stage's decoding."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Tuple

from hw3.evaluation import metrics
from hw3.models.captioner import read_checkpoint_config
from hw3.models.decoding import DecodingSettings
from hw3.pipeline import records
from hw3.pipeline.context import Context, caption_and_score, checked_training, steps, train_run, training_config
from hw3.training.config import TrainingConfig, to_argv
from hw3.pipeline.layout import P2_DATA
from hw3.pipeline.scoring import cut_lines, scored_checkpoint, setting_name
from hw3.pipeline.shipping import ship, shipped_cut, shipped_predictions
from hw3.pipeline.stage_row import OptionalStage
from hw3.pipeline.stages.compare import (COMPARE_ARCHS, COMPARE_RUNS, COMPARE_TRAINING, best_captioner_upstream,
                                         compare_best, compare_best_checkpoint)
from hw3.pipeline.stages.shared import CUT_KEYS, compare_decoding, filled, has_gpt2, row_cut
from hw3.pipeline.trainings import TRAIN_DONE, run_folder, train_config, train_inputs, train_split
from hw3.models import registry
from hw3.util.errors import UserError

# The scst stage's rollouts on the course's data: p2_train.py's own defaults, two epochs (README: GPU time)
SCST_TRAINING = dict(scst_epochs=2, scst_lr=2e-5, scst_samples=5, scst_baseline="mean")
SCST_FIXED = ("init_from", "epochs")  # what makes the stage itself: from P2's best checkpoint, self-critical only
SCST_SUITE = ("bleu", "cider", "clipscore")  # its before/after scores (metrics.py names)
SCST_KEYS = ("CIDEr", "CLIPScore", "BLEU-4")
CHANGED_CAPTIONS = (3, 2)  # the report's changed captions: the most improved by CIDEr, then the most worsened


def add_scst_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scst (--with scst): self-critical fine-tuning")
    g.add_argument("--scst", action="store_true", help="run the scst stage too (the same as --with scst)")
    g.add_argument("--scst-method", help="the PEFT attempt to fine-tune (default: P2's best by CIDEr); its options: "
                   "--train-config's \"scst\" entry")


def check_scst_args(args: argparse.Namespace) -> None:
    """--scst is --with scst; --scst-method names one of --methods, and needs the GPT-2."""
    if args.scst:
        args.with_stages = ",".join([args.with_stages, "scst"])
    if args.scst_method is not None and args.captions and not args.decoder_weights:
        raise UserError("--scst-method %s names a PEFT attempt, which needs --decoder-weights; without it the scst "
                        "stage fine-tunes the compare stage's best architecture" % args.scst_method)
    if args.scst_method is not None and args.scst_method not in args.methods:
        raise UserError("--scst-method %s is not among --methods %s" % (args.scst_method, ",".join(args.methods)))


def scst_options(ctx: Context) -> dict:
    """SCST_TRAINING under the --train-config "scst" entry."""
    return dict(SCST_TRAINING, **train_config(ctx).get("scst", {}))


def scst_argv(ctx: Context, method: str, train_json: str, init: Optional[str]) -> TrainingConfig:
    """p2_train.py's arguments for self-critical fine-tuning of `method`'s attempt (a PEFT method, or without the
    GPT-2 a compare run): the model of the checkpoint `init` (registry.model_options: --init-from fits even when it is
    a --score-checkpoints one), the attempt's training options but its model's, no cross-entropy epoch, then the scst
    options. `init` None: the attempt's own model, checked as one epoch of cross-entropy (the checkpoint does not
    exist before its training has run)."""
    compare_run = method in COMPARE_RUNS
    trained_as = dict(COMPARE_TRAINING) if compare_run else {}
    options = dict(trained_as, **train_config(ctx).get(method, {}))
    options.update(epochs=0 if init else 1, **scst_options(ctx))
    model = {} if compare_run else dict(decoder_weights=ctx.data("decoder"))
    if init:
        meta = read_checkpoint_config(init)
        model.update(registry.model_options(meta), init_from=init)
        row = registry.ARCHITECTURES[meta["arch"]]  # a from-scratch decoder's caption length is its model's
        own = row.option_names + (("max_caption_tokens",) if row.from_scratch else ())
        options = {k: v for k, v in options.items() if k.replace("-", "_") not in own}
    else:
        model.update(COMPARE_RUNS[method] if compare_run else dict(peft=method))
    return training_config(ctx, train_json, model, options)


def check_scst(ctx: Context) -> None:
    """The scst options through p2_train.py's checks with each attempt's (any may turn out best; --scst-method's
    alone when given; without the GPT-2 each compare architecture's); with --score-checkpoints,
    DIR/p2_<method>_scst.pt now when --scst-method names it, else once the best is known (stage_inputs)."""
    options = train_config(ctx).get("scst", {})
    where = "--train-config %s: scst" % ctx.args.train_config if options else "the scst stage"
    taken = sorted(k for k in options if k.replace("-", "_") in SCST_FIXED)
    if taken:
        raise UserError("%s: %s set by run_all.py itself (it fine-tunes the best checkpoint)"
                        % (where, ", ".join(taken)))
    candidates = COMPARE_ARCHS if not has_gpt2(ctx) else [ctx.args.scst_method] if ctx.args.scst_method \
        else ctx.args.methods
    for method in candidates:
        argv = scst_argv(ctx, method, ctx.data("train_json"), None).replace(out=run_folder(ctx, method, "new", "scst"))
        ctx.stage_options.setdefault("scst", {})[method] = checked_training(ctx, argv, options, where)
    if ctx.args.score_checkpoints and ctx.args.scst_method:
        scored_checkpoint(ctx, ctx.args.scst_method, "scst")


def scst_method(ctx: Context) -> Optional[str]:
    """The attempt the scst stage fine-tunes: --scst-method, else P2's best (None before P2 has run); without the
    GPT-2 the compare stage's best architecture (None before compare has run)."""
    if not has_gpt2(ctx):
        return compare_best(ctx)
    return ctx.args.scst_method or ctx.results.get("p2_best")


def scst_start(ctx: Context, method: str) -> Tuple[str, dict]:
    """The checkpoint scst starts from and the decoding both sides are scored with (with "chosen_on", as shipped):
    P2's attempt with P2's shipped decoding, or a compare run's with the compare stage's."""
    if has_gpt2(ctx):
        return ctx.results["p2"][method]["checkpoint"], ctx.results["p2_inference"]
    return ctx.results["compare"][method]["checkpoint"], dict(
        compare_decoding(), chosen_on="the compare stage's decoding of every architecture (run_all.py)")


def scst_row(scores: dict, checkpoint: str, predictions: str) -> dict:
    """One side of results.json "scst": the scores, the world-only ones as None (the demo's world stage fills them)."""
    return dict({k: scores.get(k) for k in SCST_KEYS + CUT_KEYS}, object_f1=None, exact_object_set=None,
                checkpoint=checkpoint, predictions=predictions)


def changed_captions(before: dict, after: dict, most: Tuple[int, int] = CHANGED_CAPTIONS) -> List[dict]:
    """The val images whose caption changed: the `most[0]` most improved by per-image CIDEr, then the `most[1]` most
    worsened (ties by image name)."""
    rows = [dict(image=k, before=before[k]["caption"], after=after[k]["caption"], cider_before=before[k]["cider"],
                 cider_after=after[k]["cider"]) for k in sorted(before)
            if k in after and before[k]["caption"] != after[k]["caption"]]
    gains = sorted(rows, key=lambda r: (r["cider_before"] - r["cider_after"], r["image"]))
    better = [r for r in gains if r["cider_after"] > r["cider_before"]][:most[0]]
    worse = [r for r in reversed(gains) if r["cider_after"] < r["cider_before"]][:most[1]]
    return better + worse


def stage_scst(ctx: Context) -> dict:
    """P2's best attempt fine-tuned by self-critical training (p2_train.py --init-from its scored
    checkpoint --epochs 0 --scst-epochs N, through train.new and the swap), both scored on val with the shipped
    decoding: results.json "scst" with "before" and "after"."""
    best = scst_method(ctx)
    init, shipped = scst_start(ctx, best)
    decoding = {k: v for k, v in shipped.items() if k != "chosen_on"}
    written_before = best == ctx.results.get("p2_best") or not has_gpt2(ctx)
    with steps(3, "scst") as bar:
        train_json = train_split(ctx)
        inputs = dict(train_inputs(ctx), init_from=records.fingerprint(init))
        seconds, _ = train_run(ctx, best, scst_argv(ctx, best, train_json, init), inputs, "scst")
        bar.update(1)
        clip = ctx.scoring_clip()
        ctx.say("scst: scoring %s before (%s, the shipped decoding %s)" % (best, init, setting_name(decoding)))
        if written_before:  # its captions with this decoding are P2's shipped ones or the compare stage's
            before_pred = shipped_predictions(ctx) if has_gpt2(ctx) else ctx.path("compare", best, "pred.json")
            cut = shipped_cut(ctx) if has_gpt2(ctx) else row_cut(ctx.results["compare"][best])
            before = dict(metrics.evaluate(before_pred, ctx.data("val_json"), ctx.data("val_images"),
                                           metrics.Scoring(clip=clip, device=ctx.device, metrics=SCST_SUITE),
                                           split=ctx.val_split()), **cut)
        else:
            before_pred = ctx.path("scst", best, "before.json")
            before = caption_and_score(ctx, init, DecodingSettings.from_record(decoding), before_pred, clip, SCST_SUITE)
        bar.update(1)
        checkpoint, pred = scored_checkpoint(ctx, best, "scst"), ctx.path("scst", best, "pred.json")
        ctx.say("scst: scoring %s after (%s)" % (best, checkpoint))
        after = caption_and_score(ctx, checkpoint, DecodingSettings.from_record(decoding), pred, clip, SCST_SUITE)
        bar.update(1)
    meta = read_checkpoint_config(checkpoint)
    took = meta.get("train_seconds", None if ctx.args.score_checkpoints else round(seconds, 1))
    settings = dict(meta.get("scst") or {}, init_from=init, method=best, decoding=decoding, train_seconds=took,
                    best_epoch=meta.get("epoch"), phase=meta.get("phase"))
    shipping = ship(ctx, checkpoint, shipped, ctx.path("scst", "p2_scst.pt"))  # hw3_2.sh-ready, as p2_best is
    scst = dict(method=best, settings=settings, before=scst_row(before, init, before_pred),
                after=dict(scst_row(after, checkpoint, pred), checkpoint_fingerprint=after["checkpoint_fingerprint"]),
                shipping=shipping,
                changed=changed_captions(before["per_image"], after["per_image"]))
    if (after["CIDEr"] or 0) > (before["CIDEr"] or 0):
        ctx.say("scst: CIDEr %.4f after against %.4f before: %s (+ .json) ships in place of p2_best.pt if you "
                "prefer it (--install copies p2_best)" % (after["CIDEr"], before["CIDEr"], shipping["checkpoint"]))
    outputs = ["scst/p2_scst.pt", "scst/p2_scst.json"] + ["scst/%s/%s" % (best, f) for f in (
        "pred.json", "train/best.pt", "train/" + TRAIN_DONE)] + ([] if written_before else [
            os.path.relpath(before_pred, ctx.out)])
    return dict(scst=scst, timings=dict(scst_train=round(seconds, 1)), outputs=outputs)


def scst_table(scst: dict) -> str:
    """results.md's scst section: before and after, then the captions that changed."""
    keys = filled(SCST_KEYS + ("object_f1", "exact_object_set"), (scst["before"], scst["after"]))
    lines = ["| scst: %s | %s |" % (scst["method"], " | ".join(k.replace("_", " ") for k in keys)),
             "| --- " * (1 + len(keys)) + "|"]
    for side in ("before", "after"):
        row = scst[side]
        lines.append("| %s | %s |" % (side, " | ".join("-" if row.get(k) is None else "%.4f" % row[k] for k in keys)))
    s = scst["settings"]
    lines += ["", "settings: %s" % ", ".join("%s %s" % (k, s[k]) for k in sorted(s) if k not in ("decoding",))]
    for c in scst.get("changed") or []:
        lines.append("- %s: \"%s\" (CIDEr %.3f) -> \"%s\" (%.3f)" % (c["image"], c["before"], c["cider_before"],
                                                                    c["after"], c["cider_after"]))
    cuts = cut_lines({side: scst[side] for side in ("before", "after")}, "scst")
    return "\n".join(lines + ([""] + cuts if cuts else []))


def scst_settings(ctx: Context) -> dict:
    """The attempt, its scored checkpoint, which it fine-tunes, and the shipped decoding."""
    a, method = ctx.args, scst_method(ctx)
    init = ((ctx.results.get("p2" if has_gpt2(ctx) else "compare") or {}).get(method) or {}).get("checkpoint")
    return dict(train=ctx.identity(to_argv(scst_argv(ctx, method, "", init))) if method else None,
                train_max_images=a.train_max_images,
                score_checkpoints=a.score_checkpoints, inference=ctx.results.get("p2_inference"), metrics=SCST_SUITE,
                changed=CHANGED_CAPTIONS, method=method, p2_best=ctx.results.get("p2_best"))


def scst_scored(ctx: Context) -> List[str]:
    """Checked before its training, once the attempt is known."""
    method = scst_method(ctx)
    return [scored_checkpoint(ctx, method, "scst")] if ctx.args.score_checkpoints and method else []


def scst_about(ctx: Context) -> str:
    options = ", ".join("%s %s" % (k, v) for k, v in scst_options(ctx).items())
    if has_gpt2(ctx):
        return ("self-critical fine-tuning of the best PEFT attempt or --scst-method's (CIDEr-D reward, %s), scored "
                "before and after with the shipped decoding (CIDEr, CLIPScore, BLEU-4), the captions that changed "
                "most" % options)
    return ("self-critical fine-tuning of the compare stage's best architecture by CIDEr on val (CIDEr-D reward, %s), "
            "scored before and after with the compare stage's decoding (CIDEr, CLIPScore, BLEU-4), the captions that "
            "changed most" % options)


def scst_reads(ctx: Context) -> List[str]:
    """The checkpoint it fine-tunes."""
    results, method = ctx.results, scst_method(ctx)
    starts = [results["p2"][method]["checkpoint"]] if method and method in (results.get("p2") or {}) else []
    return starts + compare_best_checkpoint(ctx)


STAGE = OptionalStage(name="scst", about=scst_about, run=stage_scst, settings=scst_settings, data=P2_DATA,
                      upstream=best_captioner_upstream, reads=scst_reads,
                      table=lambda results: [scst_table(results["scst"])] if results.get("scst") else [],
                      add_options=add_scst_options, check_args=check_scst_args, check=check_scst,
                      scored=scst_scored, trainings=None)
