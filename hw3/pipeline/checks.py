"""Everything checked before any work: the training config's entries and each training's options (through
p2_train.py's own checks), every input the chosen stages read down to each image's header, and the earlier stages an
opt-in stage starts from."""
from __future__ import annotations

import os
from typing import Dict, List

from hw3.data import caption_files
from hw3.data.images import check_image_file, list_images
from hw3.pipeline import records
from hw3.pipeline.context import Context, checked_training
from hw3.pipeline.layout import CAPTIONED_FOLDERS, DATA, IMAGE_FOLDERS
from hw3.pipeline.scoring import scored_checkpoint
from hw3.pipeline.stage_table import TABLE, declared_upstream, stage_data
from hw3.pipeline.stages.p2 import train_argv
from hw3.pipeline.trainings import run_folder, train_config
from hw3.util.errors import UserError, progress
from hw3.zeroshot import classify


def check_train_config(ctx: Context) -> None:
    """--train-config's entries name PEFT attempts of --methods, opt-in stages or compare runs: a misnamed entry
    fails first thing, in one line (trainings.train_config checks the file's form)."""
    config = train_config(ctx)
    entries = [entry for row in TABLE.values() for entry in row.entries()]
    unknown = sorted(set(config) - set(ctx.args.methods) - set(entries))
    if unknown:
        raise UserError("training config %s names %s, not among --methods %s (nor the opt-in stages' entries %s)"
                        % (ctx.args.train_config, ", ".join(unknown), ",".join(ctx.args.methods), ", ".join(entries)))


def check_train_options(ctx: Context) -> None:
    """Every --train-config entry through p2_train.py's own checks (argparse types, ranges, PEFT options), so a
    typo fails now, in one line, not after P1."""
    config = train_config(ctx)
    for method in ctx.args.methods:
        options = config.get(method, {})
        argv = train_argv(ctx, method, ctx.data("train_json")).replace(out=run_folder(ctx, method, "new"))
        where = "--train-config %s: %s" % (ctx.args.train_config, method) if options else "p2_train.py --peft " + method
        ctx.train_options[method] = checked_training(ctx, argv, options, where)


def image_paths(ctx: Context, stages: List[str]) -> List[str]:
    """Every image the chosen stages read, found as caption_files.find_images finds them (a caption file's split where
    captions name the images, so its images are checked to exist and its captions to be readable), each once: train
    and val in one folder share no image, but a path is never listed twice."""
    keys = {k for s in stages for k in stage_data(s) if k in IMAGE_FOLDERS}
    paths: Dict[str, None] = {}
    for key in sorted(keys):
        split = CAPTIONED_FOLDERS.get(key)
        if key == "p1_images":  # P1's labels come from the file names of the one folder
            names = list_images(ctx.data(key), DATA[key])
        elif split and (ctx.args.captions or os.path.isfile(ctx.data(split + "_json"))):
            names = caption_files.find_images(ctx.data(key), ctx.data(split + "_json"),
                                        split=split if ctx.args.captions else None)
        else:
            names = caption_files.find_images(ctx.data(key), what=DATA[key])
        paths.update((os.path.normpath(os.path.join(ctx.data(key), n)), None) for n in names)
    return list(paths)


def check_images(paths: List[str]) -> int:
    """Each image's header (and, for PNG/JPEG/GIF, its end): a 0-byte or truncated file is named now rather than
    after an epoch. Returns the number checked."""
    for path in progress(paths, desc="checking images", unit="image", disable=len(paths) < 200):
        check_image_file(path)
    return len(paths)


def check_inputs(ctx: Context, stages: List[str]) -> None:
    """Every input the chosen stages read, checked before any work: one line naming what is wrong."""
    for stage in stages if not ctx.args.captions else ():  # --captions and --images: checked by parse_args
        for key in stage_data(stage):
            path = ctx.data(key)
            if not os.path.exists(path):
                raise UserError("--data %s has no %s (stage %s needs it; the course's layout: %s)"
                                % (ctx.args.data, DATA[key], stage, ", ".join(sorted(set(DATA.values())))))
    if "p1" in stages:
        names = list_images(ctx.data("p1_images"), "P1 image folder")
        classes = classify.read_id2label(ctx.data("id2label"))
        classify.labels_from_names(names, len(classes), "%s against %s" % (ctx.data("p1_images"),
                                                                                   ctx.data("id2label")))
    if "p2" in stages:
        check_train_options(ctx)
        if ctx.args.score_checkpoints:
            for method in ctx.args.methods:
                scored_checkpoint(ctx, method)
    images = image_paths(ctx, stages)
    for name, row in TABLE.items():
        if name in stages:
            row.check(ctx)
    check_images(images)


def check_opt_in_upstream(ctx: Context, selected: List[str]) -> None:
    """An opt-in stage that starts from another one's results (without the GPT-2, distill and scst from the compare
    stage's best architecture): that one runs in this command or finished earlier; else one line before any work."""
    for name in selected:
        for earlier in declared_upstream(ctx, name):
            if earlier in TABLE and earlier not in selected and records.read_record(ctx.out, earlier) is None:
                raise UserError(TABLE[earlier].needed_by(name, ctx.out))


def choose_stages(ctx: Context, names: List[str]) -> List[str]:
    """The stages to run: --only's (all by default); --force of a stage not run is refused, not ignored."""
    args = ctx.args
    selected = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(names)
    for name in selected + args.force:
        if name in TABLE and name not in names:
            raise UserError("stage %s is opt-in: add --with %s" % (name, name))
        if name not in names:
            raise UserError("no stage %r (the stages: %s)" % (name, ", ".join(names)))
    left_out = [s for s in args.force if s not in selected]
    if left_out:
        raise UserError("--force %s: not among the stages to run (--only %s); add it to --only"
                        % (",".join(left_out), args.only))
    return selected
