"""The compare stage (run_all.py --with compare, and every --captions run): the classic captioners (p2_train.py --arch
gru, attention-gru, transformer, and attention-gru with --attention-reg 0) trained as the PEFT attempts are, on the
same data and feature cache, scored with the whole metric suite beside P2's best attempt ("compare" and "ablation");
on a --captions run, the attention maps of the best attentive architecture too ("attention")."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from hw3.data import caption_files
from hw3.evaluation import metrics
from hw3.attention import visualize
from hw3.models.captioner import read_checkpoint_config
from hw3.models.decoding import DecodingSettings
from hw3.pipeline import context, records
from hw3.pipeline.context import Context, caption_and_score, checked_training, decoding_flags, steps, train_run, \
    training_config
from hw3.training.config import TrainingConfig, to_argv
from hw3.pipeline.layout import P2_DATA
from hw3.pipeline.scoring import cut_lines, scored_checkpoint
from hw3.pipeline.stage_row import OptionalStage
from hw3.pipeline.stages.shared import CUT_KEYS, ROW_KEYS, SUITE, best_arch, compare_decoding, filled, has_gpt2
from hw3.pipeline.trainings import TRAIN_DONE, run_folder, train_config, train_inputs, train_split
from hw3.report import published
from hw3.util.errors import UserError
from hw3.util.files import read_json, write_json

# The compare stage's runs: each is p2_train.py --arch with these options, which --train-config may not change;
# --train-config's "gru", "attention-gru"... entries set the rest, over COMPARE_TRAINING.
COMPARE_RUNS = {"gru": dict(arch="gru"), "attention-gru": dict(arch="attention-gru", attention_reg=1),
                "transformer": dict(arch="transformer"),
                "attention-gru_reg0": dict(arch="attention-gru", attention_reg=0)}
COMPARE_ARCHS = ("gru", "attention-gru", "transformer")  # results.json "compare" rows, with "gpt2" (the best PEFT)
ABLATION = ("attention-gru", "attention-gru_reg0")  # the doubly stochastic term on (1) and off (0)
# From-scratch decoders learn their words too, so they want more epochs and a higher rate than PEFT (p2_train.py's
# defaults); Show-Attend-Tell trains about 20 epochs at 4e-4. The models are the configs' defaults (512 wide).
COMPARE_TRAINING = dict(epochs=15, batch_size=64, lr=5e-4, warmup_steps=500)
WORLD_SCORES = ("object_f1", "exact_object_set", "pointing_game")  # filled by the demo's world stage only
ATTENTIVE = ("attention-gru", "transformer")  # the architectures with attention maps (gru has none)
ATTENTION_IMAGES = 2  # a --captions run's attention figures: the best and the worst val images by CLIPScore, each


def compare_argv(ctx: Context, run: str, train_json: str) -> TrainingConfig:
    """One compare run's p2_train.py arguments: its architecture (COMPARE_RUNS), then COMPARE_TRAINING under its
    --train-config entry, on P2's data and feature cache."""
    options = dict(COMPARE_TRAINING, **train_config(ctx).get(run, {}))
    return training_config(ctx, train_json, COMPARE_RUNS[run], options)


def check_compare(ctx: Context) -> None:
    """Each run's options through p2_train.py's checks; what makes a run itself may not be changed."""
    for run, fixed in COMPARE_RUNS.items():
        options = train_config(ctx).get(run, {})
        where = "--train-config %s: %s" % (ctx.args.train_config, run) if options else "compare run " + run
        taken = sorted(k for k in options if k.replace("-", "_") in fixed)
        if taken:
            raise UserError("%s: %s set by run_all.py itself (the run's definition)" % (where, ", ".join(taken)))
        argv = compare_argv(ctx, run, ctx.data("train_json")).replace(out=run_folder(ctx, run, "new", "compare"))
        ctx.train_options[run] = checked_training(ctx, argv, options, where)
        ctx.stage_options.setdefault("compare", {})[run] = ctx.train_options[run]
        if ctx.args.score_checkpoints:
            scored_checkpoint(ctx, run, "compare")


def compare_row(scores: dict, trainable_params: int, train_seconds: Optional[float], **about) -> dict:
    """One row of results.json "compare": the metric suite (METEOR None without Java), the world-only measures as
    None (the demo's world stage fills them), parameters and training time (the scored checkpoint's own record when
    it has one, as the committed world checkpoints do; else this run's training), then what it is."""
    return dict({k: scores.get(k) for k in ROW_KEYS + CUT_KEYS}, **{k: None for k in WORLD_SCORES},
                trainable_params=trainable_params, train_seconds=train_seconds, **about)


def stage_compare(ctx: Context) -> dict:
    """Each classic architecture trained as P2's attempts are (same data, feature cache, resume and swap),
    its val captions with the README default decoding scored with the whole suite, beside P2's best attempt; on a
    --captions run, the attention maps of the best attentive architecture too ("attention")."""
    default = compare_decoding()
    with steps(2 * len(COMPARE_RUNS) + 1, "compare") as bar:
        train_json = train_split(ctx)
        seconds = {}
        for run in COMPARE_RUNS:
            seconds[run] = round(train_run(ctx, run, compare_argv(ctx, run, train_json), train_inputs(ctx),
                                           "compare")[0], 1)
            bar.update(1)
        clip = ctx.scoring_clip()
        rows, per_image = {}, {}
        for run in COMPARE_RUNS:
            checkpoint = scored_checkpoint(ctx, run, "compare")
            ctx.say("compare: scoring %s (%s) on val" % (run, checkpoint))
            scores = caption_and_score(ctx, checkpoint, DecodingSettings.from_record(default),
                                       ctx.path("compare", run, "pred.json"), clip, SUITE)
            per_image[run] = scores["per_image"]
            meta = read_checkpoint_config(checkpoint)
            reg = meta["decoder"].get("attention_reg") if meta["arch"] == "attention-gru" else None
            # the training time the scored checkpoint records; this run's only when it is this run's checkpoint
            took = meta.get("train_seconds", None if ctx.args.score_checkpoints else seconds[run])
            rows[run] = compare_row(scores, meta["trainable_parameters"], took, checkpoint=checkpoint,
                                    checkpoint_fingerprint=scores["checkpoint_fingerprint"], arch=meta["arch"],
                                    attention_reg=reg)
            bar.update(1)
        compare = {run: rows[run] for run in COMPARE_ARCHS}
        best = ctx.results.get("p2_best")
        if best:
            ctx.say("compare: scoring gpt2 (P2's best attempt, %s: its val captions) with the whole suite" % best)
            p2_row = ctx.results["p2"][best]
            scores = metrics.evaluate(ctx.path("p2", best, "pred.json"), ctx.data("val_json"), ctx.data("val_images"),
                                      metrics.Scoring(clip=clip, device=ctx.device, metrics=SUITE),
                                      split=ctx.val_split())
            seconds_then = read_checkpoint_config(p2_row["checkpoint"]).get("train_seconds")
            if seconds_then is None and not ctx.args.score_checkpoints:  # the scored checkpoint is this training's
                seconds_then = ctx.results["timings"]["p2_train"][best]
            scores = dict(scores, cut=p2_row.get("cut"), max_len=p2_row.get("max_len"))
            compare["gpt2"] = compare_row(scores, p2_row["trainable_params"], seconds_then,
                                          checkpoint=p2_row["checkpoint"], arch="gpt2", peft=best)
        else:
            ctx.say("compare: no gpt2 row (no P2 results: --captions without --decoder-weights)")
        bar.update(1)
    ablation = {run: dict(attention_reg=rows[run]["attention_reg"], CIDEr=rows[run]["CIDEr"], pointing_game=None,
                          arch=rows[run]["arch"], checkpoint=rows[run]["checkpoint"]) for run in ABLATION}
    outputs = ["compare/%s/%s" % (run, f) for run in COMPARE_RUNS
               for f in ("pred.json", "train/best.pt", "train/" + TRAIN_DONE)]
    fragment = dict(compare=compare, ablation=ablation, timings=dict(compare_train=seconds), outputs=outputs)
    attentive = best_arch(compare, ATTENTIVE) if ctx.args.captions else None
    if attentive:
        fragment["attention"] = attention_figures(ctx, attentive, compare[attentive]["checkpoint"],
                                                  per_image[attentive], default)
        outputs += ["compare/attention", "compare/%s/per_image.json" % attentive]
    return fragment


def attention_figures(ctx: Context, arch: str, checkpoint: str, per_image: dict, decoding: dict) -> dict:
    """results.json "attention" of a --captions run: P3's figures (p3_visualize.py --from-scores, the compare
    decoding) of `arch`'s best and worst ATTENTION_IMAGES val images by CLIPScore, and its best and worst caption."""
    scores, folder = ctx.path("compare", arch, "per_image.json"), ctx.path("compare", "attention")
    write_json(scores, per_image)
    ctx.say("compare: attention maps of %s, the best attentive architecture, on %d val images" % (
        arch, 2 * ATTENTION_IMAGES))
    visualize.main(["--images", ctx.data("val_images"), "--out", folder, "--from-scores", scores, "--top",
                       str(ATTENTION_IMAGES), "--bottom", str(ATTENTION_IMAGES), "--checkpoint", checkpoint,
                       "--decoder", ctx.data("decoder"), "--device", ctx.args.device]
                      + decoding_flags(DecodingSettings.from_record(decoding), checkpoint))
    figures = read_json(os.path.join(folder, "attention.json"), "attention figures")["figures"]
    drawn = {caption_files.image_key(f["image"]): os.path.relpath(os.path.join(folder, f["figure"]), ctx.out)
             for f in figures}
    ranked = sorted(per_image, key=lambda k: (-per_image[k]["clipscore"], k))

    def caption(key: str) -> dict:
        return dict(image=key, caption=per_image[key]["caption"], CIDEr=per_image[key].get("cider"),
                    CLIPScore=per_image[key]["clipscore"], figure=drawn.get(key))
    return dict(arch=arch, ranked_by="CLIPScore", figures=[drawn[k] for k in ranked if k in drawn],
                best=caption(ranked[0]), worst=caption(ranked[-1]))


def compare_table(results: dict) -> str:
    """results.md's compare section: one row per architecture, the published table beside it, the ablation."""
    rows, ablation = results["compare"], results.get("ablation") or {}
    columns = filled(ROW_KEYS + WORLD_SCORES, rows.values())

    def number(value) -> str:
        return "-" if value is None else "%.4f" % value

    lines = ["| architecture | %s | trainable params | training s |" % " | ".join(columns),
             "| --- " * (len(columns) + 3) + "|"]
    for arch, r in rows.items():
        lines.append("| %s | %s | %s | %s |" % (arch + (" (%s)" % r["peft"] if r.get("peft") else ""),
                                                " | ".join(number(r.get(k)) for k in columns),
                                                "{:,}".format(r["trainable_params"]),
                                                "-" if r.get("train_seconds") is None else r["train_seconds"]))
    lines += ["", "| published model | CIDEr (DeepFashion) | ours | CIDEr (these data) |", "| --- | --- | --- | --- |"]
    lines += ["| %s | %.3f | %s | %s |" % (model, cider, arch, number((rows.get(arch) or {}).get("CIDEr")))
              for model, arch, cider in published.DEEPFASHION_CAPTIONERS]
    lines += ["", "Published: %s." % published.COURSE_PROJECT_REPORT]
    if ablation:
        measures = filled(("CIDEr", "pointing_game"), ablation.values())
        lines += ["", "| ablation: attention-gru --attention-reg | %s |" % " | ".join(
            m.replace("_", " ") for m in measures), "| --- " * (1 + len(measures)) + "|"]
        lines += ["| %g (%s) | %s |" % (a["attention_reg"], name, " | ".join(number(a.get(m)) for m in measures))
                  for name, a in ablation.items()]
    cuts = cut_lines(rows, "compare")
    return "\n".join(lines + ([""] + cuts if cuts else []))


def attention_lines(attention: dict) -> str:
    """The best attentive architecture's attention figures and its best and worst val captions."""
    lines = ["attention maps of %s (the best attentive architecture), best and worst val images by %s: %s" % (
        attention["arch"], attention["ranked_by"], ", ".join(attention["figures"]))]
    for side in ("best", "worst"):
        c = attention[side]
        lines.append("- %s: %s, \"%s\" (CLIPScore %.4f, CIDEr %s)" % (
            side, c["image"], c["caption"], c["CLIPScore"], "-" if c.get("CIDEr") is None else "%.4f" % c["CIDEr"]))
    return "\n".join(lines)


def compare_settings(ctx: Context) -> dict:
    """The runs and P2's best attempt, whose row it copies."""
    a, best = ctx.args, ctx.results.get("p2_best")
    return dict(train=[ctx.identity(to_argv(compare_argv(ctx, run, ""))) for run in COMPARE_RUNS],
                train_max_images=a.train_max_images,
                score_checkpoints=a.score_checkpoints, decoding=context.DECODING_GRID[0], metrics=SUITE,
                p2_best=best, p2_row=records.digest(ctx.portable((ctx.results.get("p2") or {}).get(best))))


def compare_scored(ctx: Context) -> List[str]:
    return [scored_checkpoint(ctx, run, "compare") for run in COMPARE_RUNS] if ctx.args.score_checkpoints else []


def compare_best(ctx: Context) -> Optional[str]:
    """The compare stage's best architecture (None before the stage has run)."""
    return best_arch(ctx.results.get("compare") or {}, COMPARE_ARCHS)


def best_captioner_upstream(ctx: Context) -> Tuple[str, ...]:
    """The stages whose best captioner distill and scst start from: P2; without the GPT-2, also compare."""
    return ("p2",) if has_gpt2(ctx) else ("p2", "compare")


def compare_best_checkpoint(ctx: Context) -> List[str]:
    """The compare stage's best checkpoint where it stands in for P2's (no GPT-2) and the stage has run."""
    best = compare_best(ctx)
    return [ctx.results["compare"][best]["checkpoint"]] if not has_gpt2(ctx) and best else []


def no_compare_line(stage: str, out: str, which: str = "") -> str:
    return ("%s without --decoder-weights starts from the compare stage's best architecture, but %s has no finished "
            "compare stage%s: add compare to --only (or give --decoder-weights)" % (stage, out, " " + which if which
                                                                                   else ""))


def compare_about(ctx: Context) -> str:
    return ("train the classic captioners %s on P2's data and feature cache, score them beside the best PEFT (CIDEr, "
            "BLEU-4, METEOR, ROUGE-L, CLIPScore), the attention-reg ablation" % ", ".join(COMPARE_RUNS))


def compare_reads(ctx: Context) -> List[str]:
    """P2's best attempt's checkpoint, whose row it copies."""
    best = ctx.results.get("p2_best")
    return [ctx.results["p2"][best]["checkpoint"]] if best and best in (ctx.results.get("p2") or {}) else []


def compare_sections(results: dict) -> List[str]:
    sections = [compare_table(results)] if results.get("compare") else []
    return sections + ([attention_lines(results["attention"])] if results.get("attention") else [])


STAGE = OptionalStage(name="compare", about=compare_about, run=stage_compare, settings=compare_settings, data=P2_DATA,
                      upstream=lambda ctx: ("p2",), table=compare_sections, check=check_compare, reads=compare_reads,
                      scored=compare_scored, trainings=tuple(COMPARE_RUNS), config_entries=tuple(COMPARE_RUNS),
                      on_captions=True,
                      missing_line=no_compare_line)
