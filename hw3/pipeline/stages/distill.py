"""The distill stage (run_all.py --with distill): the run's best captioner captions the training images (precise and
creative), and a student trains on each caption set and on the human captions, alike but for --train-json
("distill"). The teacher is P2's shipped captioner, or without the GPT-2 (--captions without --decoder-weights) the
compare stage's best architecture by CIDEr on val."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List

from hw3.data import caption_files
from hw3.evaluation import metrics
from hw3.inference import predict
from hw3.models.captioner import config_path
from hw3.models.decoding import DEFAULT_DECODING, DecodingSettings
from hw3.models.registry import ARCHITECTURES
from hw3.pipeline import records
from hw3.pipeline.context import Context, caption_and_score, checked_training, decoding_flags, steps, train_run, \
    training_config
from hw3.training.config import TrainingConfig, to_argv
from hw3.pipeline.layout import P2_DATA
from hw3.pipeline.scoring import checkpoint_fingerprint, cut_lines, kept_part, scored_checkpoint, setting_name
from hw3.pipeline.shipping import shipped_cut, shipped_predictions
from hw3.pipeline.stage_row import OptionalStage
from hw3.pipeline.stages.compare import best_captioner_upstream, compare_best, compare_best_checkpoint
from hw3.pipeline.stages.shared import CUT_KEYS, ROW_KEYS, SUITE, compare_decoding, filled, has_gpt2, row_cut
from hw3.pipeline.trainings import TRAIN_DONE, train_config, train_inputs, train_split
from hw3.util.errors import UserError

CAPTION_SETS = ("human", "precise", "creative")  # what each distill student trains on
CREATIVE = dict(method="sample", temperature=0.9, top_k=0, top_p=1.0, seed=0)  # the teacher's "creative" captions


def add_distill_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distill (--with distill): the run's best captioner as the teacher")
    g.add_argument("--student-arch", default="gru", choices=tuple(ARCHITECTURES), help="the student's p2_train.py "
                   "--arch (default %(default)s, the smallest); its training options: --train-config's \"distill\" "
                   "entry")
    g.add_argument("--teacher-captions", type=int, default=1, help="teacher captions per training image (default "
                   "%(default)s; precise ones are the best beams, so at most its beam size)")
    g.add_argument("--score-students", metavar="DIR", help="score DIR/distill_{human,precise,creative}.pt instead of "
                   "the students' best.pt (the demo scores its converged students; the trainings still run)")


def check_distill_args(args: argparse.Namespace) -> None:
    if args.teacher_captions < 1:
        raise UserError("--teacher-captions must be 1 or more, got %d" % args.teacher_captions)


def student_argv(ctx: Context, train_json: str) -> TrainingConfig:
    """One distill student's p2_train.py arguments: only the captions (`train_json`) differ between the three."""
    model = dict(arch=ctx.args.student_arch, decoder_weights=ctx.data("decoder")
                 if ctx.args.student_arch == "gpt2" else None)
    model["val_split"] = "val" if ctx.args.captions else None  # validated on the val share, as scored
    return training_config(ctx, train_json, model, train_config(ctx).get("distill", {}))


def check_distill(ctx: Context) -> None:
    """The student's options through p2_train.py's checks, and the committed students when they are scored."""
    options = train_config(ctx).get("distill", {})
    where = "--train-config %s: distill" % ctx.args.train_config if options else "--student-arch"
    parsed = checked_training(ctx, student_argv(ctx, ctx.data("train_json")).replace(out=ctx.path("distill")),
                              options, where)
    ctx.stage_options["distill"] = {name: parsed for name in CAPTION_SETS}  # alike but for their captions
    if ctx.args.score_students:
        for name in CAPTION_SETS:
            scored_checkpoint(ctx, name, "distill")


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
    what = dict(teacher=checkpoint_fingerprint(teacher), config=records.fingerprint(config_path(teacher)),
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
    """Distillation on this data: the best captioner's (best_captioner) precise and creative captions of the
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


def distill_settings(ctx: Context) -> dict:
    """The teacher (P2's shipped checkpoint, or the compare stage's best architecture and its row), the students."""
    a = ctx.args
    teacher = (ctx.results.get("p2_shipping") or {}).get("sha256") if has_gpt2(ctx) else dict(
        arch=compare_best(ctx), row=records.digest(ctx.portable((ctx.results.get("compare") or {}).get(
            compare_best(ctx)))))
    return dict(teacher=teacher, creative=CREATIVE, inference=ctx.results.get("p2_inference"),
                student=ctx.identity(to_argv(student_argv(ctx, ""))),
                teacher_captions=a.teacher_captions, train_max_images=a.train_max_images,
                score_students=a.score_students)


def distill_scored(ctx: Context) -> List[str]:
    return [scored_checkpoint(ctx, n, "distill") for n in CAPTION_SETS] if ctx.args.score_students else []


def distill_about(ctx: Context) -> str:
    if has_gpt2(ctx):
        return ("p2_best captions the training images (precise, creative); a %s student trains on the human, precise "
                "and creative captions, each scored on val" % ctx.args.student_arch)
    return ("the teacher, the compare stage's best architecture by CIDEr on val, captions the training images "
            "(precise, creative); a %s student trains on the human, precise and creative captions, each scored on "
            "val" % ctx.args.student_arch)


def distill_reads(ctx: Context) -> List[str]:
    """The teacher's checkpoint."""
    results = ctx.results
    teachers = [results["p2_shipping"]["checkpoint"]] if results.get("p2_shipping") else []
    return teachers + compare_best_checkpoint(ctx)


STAGE = OptionalStage(name="distill", about=distill_about, run=stage_distill, settings=distill_settings, data=P2_DATA,
                      upstream=best_captioner_upstream, reads=distill_reads,
                      table=lambda results: [distill_table(results["distill"])] if results.get("distill") else [],
                      add_options=add_distill_options, check_args=check_distill_args, check=check_distill,
                      scored=distill_scored, trainings=CAPTION_SETS)
