"""run_all.py's opt-in stages (--with): distill, compare and scst, each with its constants, its checks, its
p2_train.py arguments, the stage itself and its results.md table. They cost GPU hours on the course's data.

  distill  p2_best captions the training images (precise and creative); a student trains on each caption set and on
           the human captions, alike but for --train-json ("distill"); without the GPT-2 (--captions without
           --decoder-weights) the teacher is the compare stage's best architecture by CIDEr on val
  compare  the classic captioners (p2_train.py --arch gru, attention-gru, transformer, and attention-gru with
           --attention-reg 0) trained as the PEFT attempts are, scored with the whole metric suite beside P2's best
           attempt ("compare" and "ablation")
  scst     self-critical fine-tuning of P2's best attempt (p2_train.py --init-from its checkpoint --scst-epochs N),
           scored before and after with the shipped decoding ("scst"); without the GPT-2, of the compare stage's best
           architecture, scored with the compare stage's decoding
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from hw3.report import compose
from hw3.evaluation import metrics
from hw3.data import caption_files
from hw3.inference import predict
from hw3.training import trainer
from hw3.attention import visualize
from hw3.pipeline import records
from hw3.pipeline import context
from hw3.models.decoding import DECODE_DEFAULTS, DEFAULT_DECODING, DecodingSettings
from hw3.models.captioner import config_path, read_checkpoint_config
from hw3.util.errors import UserError
from hw3.util.files import read_json, write_json
from hw3.pipeline.context import (TRAIN_DONE, Context, caption_and_score, checked_training, cut_lines, decoding_flags,
                                  kept_part, option_flags, run_folder, scored_checkpoint, setting_name, ship,
                                  shipped_cut, shipped_predictions, steps, train_config, train_inputs, train_run,
                                  train_split, trainer_argv)


# ----------------------------------------------------------------------------------------------- the best captioner

def has_gpt2(ctx: Context) -> bool:
    """The course's layout, or --captions with --decoder-weights: P2 runs, and its best attempt teaches and is
    fine-tuned; without it, the compare stage's best architecture is the run's best captioner."""
    return not ctx.args.captions or bool(ctx.args.decoder_weights)


def compare_decoding() -> dict:
    """The compare stage's decoding of every architecture (the README default), read when called (tests shorten
    run_context.DECODING_GRID)."""
    return dict(DECODE_DEFAULTS, **context.DECODING_GRID[0])


def best_arch(rows: dict, archs: Tuple[str, ...]) -> Optional[str]:
    """The best of `archs` among compare rows by CIDEr on val (ties: the earlier), None when none is scored."""
    scored = [a for a in archs if a in rows and rows[a].get("CIDEr") is not None]
    return max(scored, key=lambda a: rows[a]["CIDEr"]) if scored else None


def compare_best(ctx: Context) -> Optional[str]:
    """The compare stage's best architecture (None before the stage has run)."""
    return best_arch(ctx.results.get("compare") or {}, COMPARE_ARCHS)


def best_captioner(ctx: Context) -> dict:
    """The run's best captioner, which distill takes as its teacher: P2's shipped one with its chosen decoding, or
    without the GPT-2 the compare stage's best architecture with the compare decoding; its checkpoint, architecture,
    val captions with that decoding, and why it was chosen."""
    if has_gpt2(ctx):
        shipped = {k: v for k, v in ctx.results["p2_inference"].items() if k != "chosen_on"}
        return dict(checkpoint=ctx.results["p2_shipping"]["checkpoint"], arch="gpt2", decoding=shipped,
                    predictions=shipped_predictions(ctx), cut=shipped_cut(ctx), chosen_on="P2's best attempt by CIDEr")
    arch = compare_best(ctx)
    row = ctx.results["compare"][arch]
    return dict(checkpoint=row["checkpoint"], arch=arch, decoding=compare_decoding(),
                predictions=ctx.path("compare", arch, "pred.json"), cut=row_cut(row),
                chosen_on="the compare stage's best architecture by CIDEr on val (%.4f)" % row["CIDEr"])


def row_cut(row: dict) -> Dict[str, Optional[int]]:
    """A scored row's "cut" and "max_len" (CUT_KEYS), for another row scored on the same captions."""
    return {k: row.get(k) for k in CUT_KEYS}


# ----------------------------------------------------------------------------------------------- distill

CAPTION_SETS = ("human", "precise", "creative")  # what each distill student trains on
CREATIVE = dict(method="sample", temperature=0.9, top_k=0, top_p=1.0, seed=0)  # seed 004 section 4's "creative"
SUITE = ("bleu", "meteor", "rouge", "cider", "clipscore")  # each distill and compare row's scores (metrics.py names)
ROW_KEYS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "CLIPScore")
CUT_KEYS = ("cut", "max_len")  # run_context.caption_and_score's count of cut captions, and the length they reached


def student_argv(ctx: Context, train_json: str) -> List[str]:
    """One distill student's p2_train.py arguments: only the captions (`train_json`) differ between the three."""
    model = ["--arch", ctx.args.student_arch] + (["--decoder-weights", ctx.data("decoder")]
                                                if ctx.args.student_arch == "gpt2" else [])
    model += ["--val-split", "val"] if ctx.args.captions else []  # validated on the val share, as scored
    return trainer_argv(ctx, train_json, model, train_config(ctx).get("distill", {}))


def check_distill(ctx: Context) -> None:
    """The student's options through p2_train.py's checks, and the committed students when they are scored."""
    options = train_config(ctx).get("distill", {})
    where = "--train-config %s: distill" % ctx.args.train_config if options else "--student-arch"
    checked_training(ctx, student_argv(ctx, ctx.data("train_json")) + ["--out", ctx.path("distill")], options, where)
    if ctx.args.score_students:
        for name in CAPTION_SETS:
            scored_checkpoint(ctx, name, "distill")


def teacher_decodings(ctx: Context, shipped: dict) -> Dict[str, dict]:
    """precise: the teacher's decoding (hw3_2.sh's with p2_best), at most its beam size in captions per image (one if
    greedy was chosen); creative: sampling at 0.9 with its lengths."""
    shipped = dict(shipped, max_len=max(int(shipped["max_len"]), ctx.scoring_max_len()))  # uncut, as the data
    lengths = {k: shipped[k] for k in ("max_len", "min_len", "no_repeat_ngram")}
    beams = shipped["beam_size"] if shipped["method"] == "beam" else 1
    return dict(precise=dict(shipped, captions_per_image=min(ctx.args.teacher_captions, beams)),
                creative=dict(lengths, captions_per_image=ctx.args.teacher_captions, **CREATIVE))


def teacher_split(ctx: Context) -> str:
    """The training images the teacher captions: the whole of the course's train.json, the train split of a
    --captions file (its val images stay unseen by the students)."""
    return "train" if ctx.args.captions else "all"


def teacher_captions(ctx: Context, settings: dict, human: str, path: str, checkpoint: str) -> str:
    """The teacher's captions of the training images `human` names, as a COCO file p2_train.py reads (--format
    coco)."""
    predict.main([ctx.data("train_images"), path, ctx.data("decoder"), "--checkpoint", checkpoint, "--captions",
                       human, "--split", teacher_split(ctx), "--format", "coco", "--captions-per-image",
                       str(settings["captions_per_image"]), "--device", ctx.args.device, "--num-workers",
                       str(ctx.args.workers)] + decoding_flags(DecodingSettings.from_record(settings), checkpoint))
    return path


def kept_teacher_captions(ctx: Context, settings: dict, human: str, path: str, teacher: str) -> str:
    """teacher_captions, kept as a finished part of the stage while the teacher, its decoding and the training
    images are unchanged: a restart after a kill does not caption the training set again."""
    what = dict(teacher=context.checkpoint_fingerprint(teacher), config=records.fingerprint(config_path(teacher)),
                settings=settings, human=records.fingerprint(human),
                data=ctx.inputs([ctx.data(k) for k in ("train_images", "decoder")]))
    return kept_part(ctx, "teacher captions %s" % os.path.basename(path), what, [path],
                     lambda: teacher_captions(ctx, settings, human, path, teacher))


def distill_row(scores: dict, captions_per_image: float, predictions: str) -> dict:
    """object_f1 is the miniature world's (its extra stage fills it in); None on other data. "cut" and "max_len":
    the scored captions that reached the length limit without their end token, and that limit."""
    return dict({k: scores.get(k) for k in ROW_KEYS + CUT_KEYS}, object_f1=None,
                captions_per_image=captions_per_image, predictions=predictions)


def stage_distill(ctx: Context) -> dict:
    """Seed 004 section 4 on this data: the best captioner's (best_captioner) precise and creative captions of the
    training images, and one student trained on each caption set and on the human captions, alike but for
    --train-json."""
    human = train_split(ctx)
    teacher = best_captioner(ctx)
    ctx.say("distill: the teacher is %s (%s, %s)" % (teacher["arch"], teacher["chosen_on"], teacher["checkpoint"]))
    decodings = teacher_decodings(ctx, teacher["decoding"])
    human_set = caption_files.load_captions(human, ctx.data("train_images"), split=teacher_split(ctx))
    per_image = dict(human=round(sum(map(len, human_set.captions)) / len(human_set.names), 2),
                     **{name: decodings[name]["captions_per_image"] for name in ("precise", "creative")})
    with steps(2 + 2 * len(CAPTION_SETS), "distill") as bar:
        captions = dict(human=human)
        for name in ("precise", "creative"):
            path = ctx.path("distill", "teacher_%s.json" % name)
            captions[name] = kept_teacher_captions(ctx, decodings[name], human, path, teacher["checkpoint"])
            bar.update(1)
        clip = ctx.scoring_clip()
        teacher_pred = teacher["predictions"]
        rows = dict(teacher=dict(distill_row(dict(metrics.evaluate(
            teacher_pred, ctx.data("val_json"), ctx.data("val_images"),
            metrics.Scoring(clip=clip, device=ctx.device, metrics=SUITE), split=ctx.val_split()),
            **teacher["cut"]), ctx.args.teacher_captions, teacher_pred),
            checkpoint=teacher["checkpoint"], decoding=decodings, arch=teacher["arch"], chosen_on=teacher["chosen_on"]))
        seconds = {}
        for name in CAPTION_SETS:
            inputs = dict(train_inputs(ctx), captions=records.fingerprint(captions[name]))
            seconds[name] = round(train_run(ctx, name, student_argv(ctx, captions[name]), inputs, "distill")[0], 1)
            bar.update(1)
            checkpoint, pred = scored_checkpoint(ctx, name, "distill"), ctx.path("distill", name, "pred.json")
            scores = caption_and_score(ctx, checkpoint, DEFAULT_DECODING, pred, clip, SUITE)
            rows[name] = dict(distill_row(scores, per_image[name], pred), checkpoint=checkpoint,
                              checkpoint_fingerprint=scores["checkpoint_fingerprint"], arch=ctx.args.student_arch)
            bar.update(1)
    outputs = ["distill/teacher_precise.json", "distill/teacher_creative.json"]
    outputs += ["distill/%s/%s" % (n, f) for n in CAPTION_SETS
                for f in ("pred.json", "train/best.pt", "train/" + TRAIN_DONE)]
    return dict(distill=rows, timings=dict(distill_train=seconds), outputs=outputs)


def filled(keys: Tuple[str, ...], rows) -> Tuple[str, ...]:
    """The columns of a results.md table that some row fills (the world-only ones are None on other data)."""
    rows = list(rows)
    return tuple(k for k in keys if any(row.get(k) is not None for row in rows))


def distill_table(rows: dict) -> str:
    """The distill stage's table: the teacher and the three students, each scored on val's human references."""
    keys = filled(ROW_KEYS + ("object_f1", "captions_per_image"), rows.values())
    lines = ["| distill: trained on | %s |" % " | ".join(k.replace("_", " ") for k in keys), "| --- " * (1 + len(keys))
             + "|"]
    for name, row in rows.items():
        label = "(the teacher%s, %s)" % ("" if row.get("arch", "gpt2") == "gpt2" else ": " + row["arch"],
                                         setting_name(row["decoding"]["precise"])) if name == "teacher" else name
        lines.append("| %s | %s |" % (label, " | ".join("-" if row.get(k) is None else "%.4g" % row[k] for k in keys)))
    cuts = cut_lines(rows, "distill")
    return "\n".join(lines + ([""] + cuts if cuts else []))


# ----------------------------------------------------------------------------------------------- compare

# The compare stage's runs (issue 20): each is p2_train.py --arch with these options, which --train-config may not
# change; --train-config's "gru", "attention-gru"... entries set the rest, over COMPARE_TRAINING.
COMPARE_RUNS = {"gru": dict(arch="gru"), "attention-gru": dict(arch="attention-gru", attention_reg="1"),
                "transformer": dict(arch="transformer"),
                "attention-gru_reg0": dict(arch="attention-gru", attention_reg="0")}
COMPARE_ARCHS = ("gru", "attention-gru", "transformer")  # results.json "compare" rows, with "gpt2" (the best PEFT)
ABLATION = ("attention-gru", "attention-gru_reg0")  # the doubly stochastic term on (1) and off (0)
# From-scratch decoders learn their words too, so they want more epochs and a higher rate than PEFT (p2_train.py's
# defaults); Show-Attend-Tell trains about 20 epochs at 4e-4. The models are the configs' defaults (512 wide).
COMPARE_TRAINING = dict(epochs=15, batch_size=64, lr=5e-4, warmup_steps=500)
WORLD_SCORES = ("object_f1", "exact_object_set", "pointing_game")  # filled by the demo's world stage only
ATTENTIVE = ("attention-gru", "transformer")  # the architectures with attention maps (gru has none)
ATTENTION_IMAGES = 2  # a --captions run's attention figures: the best and the worst val images by CLIPScore, each


def compare_argv(ctx: Context, run: str, train_json: str) -> List[str]:
    """One compare run's p2_train.py arguments: its architecture (COMPARE_RUNS), then COMPARE_TRAINING under its
    --train-config entry, on P2's data and feature cache."""
    options = dict(COMPARE_TRAINING, **train_config(ctx).get(run, {}))
    return trainer_argv(ctx, train_json, option_flags(COMPARE_RUNS[run]), options)


def check_compare(ctx: Context) -> None:
    """Each run's options through p2_train.py's checks; what makes a run itself may not be changed."""
    for run, fixed in COMPARE_RUNS.items():
        options = train_config(ctx).get(run, {})
        where = "--train-config %s: %s" % (ctx.args.train_config, run) if options else "compare run " + run
        taken = sorted(k for k in options if k.replace("-", "_") in fixed)
        if taken:
            raise UserError("%s: %s set by run_all.py itself (the run's definition)" % (where, ", ".join(taken)))
        argv = compare_argv(ctx, run, ctx.data("train_json")) + ["--out", run_folder(ctx, run, "new", "compare")]
        ctx.train_options[run] = checked_training(ctx, argv, options, where)
        if ctx.args.score_checkpoints:
            scored_checkpoint(ctx, run, "compare")


def compare_row(scores: dict, trainable_params: int, train_seconds: Optional[float], **about) -> dict:
    """One row of results.json "compare": the metric suite (METEOR None without Java), the world-only measures as
    None (the demo's world stage fills them), parameters and training time (the scored checkpoint's own record when
    it has one, as the committed world checkpoints do; else this run's training), then what it is."""
    return dict({k: scores.get(k) for k in ROW_KEYS + CUT_KEYS}, **{k: None for k in WORLD_SCORES},
                trainable_params=trainable_params, train_seconds=train_seconds, **about)


def stage_compare(ctx: Context) -> dict:
    """Issue 20: each classic architecture trained as P2's attempts are (same data, feature cache, resume and swap),
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
    """results.md's compare section: one row per architecture, the seed's table beside it, the ablation."""
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
              for model, arch, cider in compose.COMPARE_SEED_TABLE]
    lines += ["", "Published: %s." % compose.COMPARE_SEED_CITATION]
    if ablation:
        measures = filled(("CIDEr", "pointing_game"), ablation.values())
        lines += ["", "| ablation: attention-gru --attention-reg | %s |" % " | ".join(
            m.replace("_", " ") for m in measures), "| --- " * (1 + len(measures)) + "|"]
        lines += ["| %g (%s) | %s |" % (a["attention_reg"], name, " | ".join(number(a.get(m)) for m in measures))
                  for name, a in ablation.items()]
    cuts = cut_lines(rows, "compare")
    return "\n".join(lines + ([""] + cuts if cuts else []))


# ----------------------------------------------------------------------------------------------- scst

# The scst stage's rollouts on the course's data: p2_train.py's own defaults, two epochs (README: GPU time)
SCST_TRAINING = dict(scst_epochs=2, scst_lr=2e-5, scst_samples=5, scst_baseline="mean")
SCST_FIXED = ("init_from", "epochs")  # what makes the stage itself: from P2's best checkpoint, self-critical only
SCST_SUITE = ("bleu", "cider", "clipscore")  # its before/after scores (metrics.py names)
SCST_KEYS = ("CIDEr", "CLIPScore", "BLEU-4")
CHANGED_CAPTIONS = (3, 2)  # the report's changed captions: the most improved by CIDEr, then the most worsened


def scst_options(ctx: Context) -> dict:
    """SCST_TRAINING under the --train-config "scst" entry."""
    return dict(SCST_TRAINING, **train_config(ctx).get("scst", {}))


def scst_argv(ctx: Context, method: str, train_json: str, init: Optional[str]) -> List[str]:
    """p2_train.py's arguments for self-critical fine-tuning of `method`'s attempt (a PEFT method, or without the
    GPT-2 a compare run): the model of the checkpoint `init` (p2_train.model_flags: --init-from fits even when it is
    a --score-checkpoints one), the attempt's training options but its model's, no cross-entropy epoch, then the scst
    options. `init` None: the attempt's own model, checked as one epoch of cross-entropy (the checkpoint does not
    exist before its training has run)."""
    compare_run = method in COMPARE_RUNS
    trained_as = dict(COMPARE_TRAINING) if compare_run else {}
    options = dict(trained_as, **train_config(ctx).get(method, {}))
    options.update(epochs=0 if init else 1, **scst_options(ctx))
    model = [] if compare_run else ["--decoder-weights", ctx.data("decoder")]
    if init:
        meta = read_checkpoint_config(init)
        model += trainer.model_flags(meta) + ["--init-from", init]
        arch = meta.get("arch", "gpt2")  # a from-scratch decoder's caption length is its model's (model_flags)
        own = trainer.ARCH_OPTIONS[arch] + (() if arch == "gpt2" else ("max_caption_tokens",))
        options = {k: v for k, v in options.items() if k.replace("-", "_") not in own}
    else:
        model += option_flags(COMPARE_RUNS[method]) if compare_run else ["--peft", method]
    return trainer_argv(ctx, train_json, model, options)


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
        argv = scst_argv(ctx, method, ctx.data("train_json"), None) + ["--out", run_folder(ctx, method, "new", "scst")]
        checked_training(ctx, argv, options, where)
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
    """Issue 22: P2's best attempt fine-tuned by self-critical training (p2_train.py --init-from its scored
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


# ----------------------------------------------------------------------------------------------- what run_all asks

def distill_settings(ctx: Context) -> dict:
    """The teacher (P2's shipped checkpoint, or the compare stage's best architecture and its row), the students."""
    a = ctx.args
    teacher = (ctx.results.get("p2_shipping") or {}).get("sha256") if has_gpt2(ctx) else dict(
        arch=compare_best(ctx), row=records.digest(ctx.portable((ctx.results.get("compare") or {}).get(
            compare_best(ctx)))))
    return dict(teacher=teacher, creative=CREATIVE, inference=ctx.results.get("p2_inference"),
                student=ctx.identity(student_argv(ctx, "")),
                teacher_captions=a.teacher_captions, train_max_images=a.train_max_images,
                score_students=a.score_students)


def compare_settings(ctx: Context) -> dict:
    """The runs and P2's best attempt, whose row it copies."""
    a, best = ctx.args, ctx.results.get("p2_best")
    return dict(train=[ctx.identity(compare_argv(ctx, run, "")) for run in COMPARE_RUNS],
                train_max_images=a.train_max_images,
                score_checkpoints=a.score_checkpoints, decoding=context.DECODING_GRID[0], metrics=SUITE,
                p2_best=best, p2_row=records.digest(ctx.portable((ctx.results.get("p2") or {}).get(best))))


def scst_settings(ctx: Context) -> dict:
    """The attempt, its scored checkpoint, which it fine-tunes, and the shipped decoding."""
    a, method = ctx.args, scst_method(ctx)
    init = ((ctx.results.get("p2" if has_gpt2(ctx) else "compare") or {}).get(method) or {}).get("checkpoint")
    return dict(train=ctx.identity(scst_argv(ctx, method, "", init)) if method else None,
                train_max_images=a.train_max_images,
                score_checkpoints=a.score_checkpoints, inference=ctx.results.get("p2_inference"), metrics=SCST_SUITE,
                changed=CHANGED_CAPTIONS, method=method, p2_best=ctx.results.get("p2_best"))


def distill_scored(ctx: Context) -> List[str]:
    return [scored_checkpoint(ctx, n, "distill") for n in CAPTION_SETS] if ctx.args.score_students else []


def compare_scored(ctx: Context) -> List[str]:
    return [scored_checkpoint(ctx, run, "compare") for run in COMPARE_RUNS] if ctx.args.score_checkpoints else []


def scst_scored(ctx: Context) -> List[str]:
    """Checked before its training, once the attempt is known."""
    method = scst_method(ctx)
    return [scored_checkpoint(ctx, method, "scst")] if ctx.args.score_checkpoints and method else []


class OptionalStage(NamedTuple):
    """What run_all needs of an opt-in stage: the stage, its checks before any work, what its results depend on
    besides files (settings), the committed checkpoints it scores in its trainings' place (with their JSON, inputs),
    and the names of its trainings (run folders) or None for --methods."""
    run: Callable[[Context], dict]
    check: Callable[[Context], None]
    settings: Callable[[Context], dict]
    scored: Callable[[Context], List[str]]
    trainings: Optional[Tuple[str, ...]]


STAGES = dict(distill=OptionalStage(stage_distill, check_distill, distill_settings, distill_scored, CAPTION_SETS),
              compare=OptionalStage(stage_compare, check_compare, compare_settings, compare_scored,
                                    tuple(COMPARE_RUNS)),
              scst=OptionalStage(stage_scst, check_scst, scst_settings, scst_scored, None))
