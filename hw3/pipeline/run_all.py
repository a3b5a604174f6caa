"""The whole homework in one command, on the course's data layout, resumable stage by stage.

    python3 run_all.py --data hw3_data --out outputs/hw3            # P1, P2 (three PEFT attempts), P3, the report
    python3 run_all.py --data hw3_data --out outputs/hw3 --install  # ... and copy the best captioner to checkpoints/
    torchrun --nproc_per_node 2 run_all.py --data hw3_data --out outputs/hw3   # training on two GPUs (DDP)
    python3 run_all.py --data hw3_data --out outputs/hw3 --with compare  # ... and the classic architectures (GPU hours)
    python3 run_all.py --captions captions.json --images images/ --out outputs/fashion  # another dataset: compare,
                                                                   # report (and P2 with --decoder-weights FILE)

DATA holds p1_data/val/{label}_{id}.png + p1_data/id2label.json, p2_data/images/{train,val}/ + p2_data/train.json +
p2_data/val.json + p2_data/decoder_model.bin, p3_data/images/. The stages:

  p1      zero-shot classification with accuracy, the report's three prompts and the ensemble, the top-5 figure
  p2      train each PEFT attempt (one shared feature cache; an interrupted training resumes), score each on val
          (CIDEr, CLIPScore, trainable parameters, time), pick the best by CIDEr, tune its decoding on val, write
          the shippable checkpoint OUT/p2/p2_best.{pt,json} with the chosen decoding under "inference"
  p3      attention figures of p3_data/images, and of the best and worst validation captions by CLIPScore
  report  results.json (with the command and its source), results.md, report.pdf (make_report.py)
  compare (opt-in, --with compare: hours of GPU) the classic captioners (p2_train.py --arch gru, attention-gru,
          transformer, and attention-gru with --attention-reg 0) trained as the PEFT attempts are, on the same data and
          feature cache, scored with the whole metric suite beside P2's best attempt ("compare" and "ablation")
  distill (opt-in, --with distill) p2_best captions the training images (precise and creative); a student trains on
          each caption set and on the human captions, alike but for --train-json ("distill"); on --captions without
          --decoder-weights the teacher is the compare stage's best architecture, which scst then fine-tunes
  scst    (opt-in, --with scst) self-critical fine-tuning of P2's best attempt (p2_train.py --init-from its checkpoint
          --scst-epochs N; options: SCST_TRAINING under --train-config's "scst" entry), scored before and after
          with the shipped decoding ("scst": CIDEr, CLIPScore, BLEU-4, the captions that changed most)

Everything is checked before any work (options, the training config, OUT, the data down to each image's header).
One run at a time per OUT (a lock). A finished stage is skipped only while it is still true: its record in
OUT/stages/ holds its settings and fingerprints of its inputs and outputs (records.py), and the line that skips or
reruns it says why. --force STAGE redoes one from its start (a training included), keeping the old result until the
new one is complete; --only runs some. A new training is built beside the finished one and swapped in when it ends,
so a failed or killed run never loses finished work. Progress goes to stderr, one log (JSONL) to OUT/run_all.log.


This module is the command line and main(); the stages are hw3/pipeline/stages/ (an opt-in stage is one row of
stage_table.py), and they call the scripts' main() functions in this process (p1_clip_zeroshot, p2_train,
p2_inference, p3_visualize) and make_report's build, so every number comes from the code a student would run by hand.
The offline demo (miniworld/demo.py) runs it and adds the world-only measures with --extra-stage.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import List, Optional

from hw3.data import caption_files
from hw3.models import clip_backend
from hw3.pipeline import checks, plan, records, runner
from hw3.pipeline.context import Context
from hw3.pipeline.data_summary import describe_data
from hw3.pipeline.shipping import install, shipping_note
from hw3.pipeline.stage_table import CORE_STAGES, TABLE
from hw3.pipeline.stages.p2 import METHODS, train_method
from hw3.pipeline.stages.report import command
from hw3.pipeline.trainings import train_split
from hw3.models.registry import PEFT_METHODS
from hw3.util.errors import UserError, run_main

STUDENT_ID = re.compile(r"^[A-Za-z0-9]+$")


# ----------------------------------------------------------------------------------------------- the command line

def add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("--data", help="the course's hw3_data folder (p1_data, p2_data, p3_data)")
    g.add_argument("--out", required=True, help="output folder (results, figures, checkpoints, stage records)")
    g.add_argument("--only", help="comma list of stages to run (%s, or an --extra-stage); the others' earlier "
                   "results are kept while still true" % ", ".join(CORE_STAGES))
    g.add_argument("--force", action="append", default=[], help="redo this stage from its start, a training "
                   "included, even if finished (repeatable; comma lists too)")
    g.add_argument("--install", action="store_true", help="copy the best captioner to checkpoints/p2_best.{pt,json}")
    g.add_argument("--with", dest="with_stages", default="", metavar="STAGE,...", help="opt-in stages to run too "
                   "(%s); each costs GPU hours on the course's data (README)" % ", ".join(TABLE))
    g.add_argument("--extra-stage", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a stage of your own, run before the report: FUNCTION(context) returns results to merge")
    g.add_argument("--student-id", help="your student ID: the report is written as OUT/hw3_<ID>.pdf with the ID on "
                   "its title page, as the course asks")


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("another dataset instead of --data: the P2, %s and report stages" % ", ".join(
        name for name, row in TABLE.items() if row.on_captions))
    g.add_argument("--captions", metavar="FILE", help="one caption file of any format p2_train.py reads (COCO, "
                   "Karpathy split JSON, DeepFashion-MultiModal captions.json, {file name: captions}): trained on its "
                   "train split, scored on its val split (a file without splits: divided by file-name hash, %g to "
                   "val, as p2_train.py does)" % caption_files.VAL_FRACTION)
    g.add_argument("--images", metavar="DIR", help="the folder of --captions' images")
    g.add_argument("--decoder-weights", metavar="FILE", help="the course's decoder_model.bin, for the P2 (GPT-2 "
                   "PEFT) stage; without it only the compare stage's from-scratch decoders are trained")


def add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("P2 training")
    g.add_argument("--methods", default=",".join(METHODS), help="PEFT attempts (p2_train.py --peft), default "
                   "%(default)s")
    g.add_argument("--train-config", metavar="JSON", help="per-attempt p2_train.py options, e.g. "
                   "{\"lora\": {\"lr\": 0.0005, \"epochs\": 8}}; without it, p2_train.py's defaults (the README's "
                   "recipe: 10 epochs, batch 32, lr 2e-4, fp16 on CUDA)")
    g.add_argument("--train-max-images", type=int, default=0, help="train on the first N training images only "
                   "(smoke runs; 0 = all)")
    g.add_argument("--no-feature-cache", action="store_true", help="run the frozen ViT at every training step "
                   "instead of once into OUT/p2/feature_cache (0.63 MB per image with ViT-H/14)")
    g.add_argument("--score-checkpoints", metavar="DIR", help="score DIR/p2_METHOD.pt instead of the trainings' "
                   "best.pt (the demo scores its converged captioners; the trainings still run)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (defaults: the scripts' own)")
    g.add_argument("--p1-model", help="P1's CLIP (p1_clip_zeroshot.py --model)")
    g.add_argument("--p1-pretrained", help="P1's CLIP weights (p1_clip_zeroshot.py --pretrained)")
    g.add_argument("--clip-model", help="CLIP for CLIPScore (default %s)" % clip_backend.CLIPSCORE_CLIP[0])
    g.add_argument("--clip-pretrained", help="its weights (default %s)" % clip_backend.CLIPSCORE_CLIP[1])
    g.add_argument("--encoder", help="P2's frozen ViT (p2_train.py --encoder)")


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")


def build_parser() -> argparse.ArgumentParser:
    """run_all's options, each opt-in stage's own group (its row's add_options) after P2's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (add_run_options, add_dataset_options, add_training_options):
        add(p)
    for row in TABLE.values():
        row.add_options(p)
    add_model_options(p)
    add_runtime_options(p)
    return p


def parse_args(argv: List[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_methods(args)
    if bool(args.clip_model) != bool(args.clip_pretrained):
        raise UserError("--clip-model and --clip-pretrained go together")
    check_data_options(args)
    if args.workers < 0 or args.train_max_images < 0:
        raise UserError("--workers and --train-max-images must be 0 or more")
    if args.student_id is not None and not STUDENT_ID.match(args.student_id):
        raise UserError("--student-id %r: letters and digits only (e.g. r12345678)" % args.student_id)
    args.force = [s.strip() for f in args.force for s in f.split(",") if s.strip()]
    for row in TABLE.values():
        row.check_args(args)
    check_with(args)
    return args


def check_methods(args: argparse.Namespace) -> None:
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in PEFT_METHODS]
    if bad or not args.methods:
        raise UserError("--methods: %s is not a PEFT method (%s)" % (",".join(bad) or "(none)",
                                                                    ", ".join(PEFT_METHODS)))
    if len(set(args.methods)) != len(args.methods):
        raise UserError("--methods names a method twice: %s" % ",".join(args.methods))


def check_with(args: argparse.Namespace) -> None:
    """--with's comma list, each stage once, each in the stage table."""
    args.with_stages = list(dict.fromkeys(s.strip() for s in args.with_stages.split(",") if s.strip()))
    unknown = [s for s in args.with_stages if s not in TABLE]
    if unknown:
        raise UserError("--with %s: not an opt-in stage (%s)" % (",".join(unknown), ", ".join(TABLE)))
    if args.with_stages and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--with %s trains on one process: run it without torchrun" % ",".join(args.with_stages))


def check_data_options(args: argparse.Namespace) -> None:
    """--data, or --captions with --images (then the compare stage runs, and P2 with --decoder-weights)."""
    if args.captions or args.images:
        if args.data or not (args.captions and args.images):
            raise UserError("give --data (the course's hw3_data), or --captions FILE with --images DIR (another "
                            "dataset), not both")
        for path, what in ((args.captions, "--captions"), (args.decoder_weights, "--decoder-weights")):
            if path and not os.path.isfile(path):
                raise UserError("%s %s is not a file" % (what, path))
        if not os.path.isdir(args.images):
            raise UserError("--images %s is not a folder" % args.images)
        if args.train_max_images:
            raise UserError("--train-max-images works with --data only (a --captions file is split by its own rules)")
        args.data = args.images  # <DATA> in records: the image folder
        args.with_stages = ",".join([args.with_stages] + [n for n, row in TABLE.items() if row.on_captions])
        return
    if args.decoder_weights:
        raise UserError("--decoder-weights goes with --captions (--data has p2_data/decoder_model.bin)")
    if not args.data or not os.path.isdir(args.data):
        raise UserError("--data %s is not a folder (the course's hw3_data)" % args.data)


# ----------------------------------------------------------------------------------------------- main

def join_trainings(ctx: Context, selected: List[str]) -> None:
    """Under torchrun, the other ranks join each P2 training and leave the rest to rank 0."""
    if "p2" in selected:
        checks.check_train_options(ctx)
        train_json = train_split(ctx)
        for method in ctx.args.methods:
            train_method(ctx, method, train_json)


def run_stages(ctx: Context, stages: List[tuple], selected: List[str]) -> None:
    """Each stage in order under OUT's lock, after the plan; then the shipping note and --install."""
    with records.RunLock(ctx.out, command(ctx)):
        removed = records.remove_temporaries(ctx.out)
        if removed:
            ctx.say("removed %d temporary file(s) of an interrupted run: %s" % (len(removed), ", ".join(removed[:5])))
        plan.print_plan(ctx, stages, selected)
        names = [s[0] for s in stages]
        for name, function, _ in stages:
            if name in selected:
                runner.check_upstream_results(ctx, name, names)
            runner.run_stage(ctx, name, function, name in selected)
        if ctx.results.get("p2_shipping"):
            print(shipping_note(ctx.results["p2_shipping"]))
        if ctx.args.install:
            install(ctx)


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # missing weights fail at once (hw3_download.sh fetches them)
    argv = list(sys.argv[1:] if argv is None else argv)
    ctx = Context(parse_args(argv), argv)
    checks.check_train_config(ctx)
    stages = plan.stage_list(ctx)
    selected = checks.choose_stages(ctx, [s[0] for s in stages])
    if ctx.rank != 0:
        join_trainings(ctx, selected)
        return 0
    records.check_out_folder(ctx.out)
    checks.check_opt_in_upstream(ctx, selected)
    checks.check_inputs(ctx, selected)
    os.makedirs(ctx.out, exist_ok=True)  # only now: a refused run leaves no OUT behind
    if ctx.args.captions:
        ctx.results["data"] = describe_data(ctx)
    started = time.time()
    run_stages(ctx, stages, selected)
    print("run_all: %s in %.0f s (results in %s)" % (", ".join(selected), time.time() - started, ctx.out))
    return 0


if __name__ == "__main__":
    run_main(main)
