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
OUT/stages/ holds its settings and fingerprints of its inputs and outputs (pipeline.py), and the line that skips or
reruns it says why. --force STAGE redoes one from its start (a training included), keeping the old result until the
new one is complete; --only runs some. A new training is built beside the finished one and swapped in when it ends,
so a failed or killed run never loses finished work. Progress goes to stderr, one log (JSONL) to OUT/run_all.log.

This file is the pipeline's stages, not a module: it calls the scripts' main() functions in this process
(p1_clip_zeroshot, p2_train, p2_inference, p3_visualize) and make_report.build, so every number comes from the code
a student would run by hand. No module imports it; the offline demo (miniworld/demo.py) runs it and adds the
world-only measures with --extra-stage.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from hw3.models import clip_backend
from hw3.report import compose
from hw3.pipeline import optional_stages
from hw3.zeroshot import classify
from hw3.zeroshot import prompt_templates
from hw3.data import caption_files, datasets
from hw3.training import trainer
from hw3.attention import visualize
from hw3.pipeline import records
from hw3.report import answer_file
from hw3.util import resources
from hw3.pipeline import context
from hw3.models.decoding import DECODE_DEFAULTS, DecodingSettings
from hw3.models.captioner import ARCHITECTURES, config_path, read_checkpoint_config
from hw3.data.images import check_image_file, list_images
from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import atomic_write, read_json, write_json
from hw3.pipeline.optional_stages import COMPARE_RUNS, compare_table, distill_table, scst_options, scst_table
from hw3.pipeline.context import (DATA, IMAGE_FOLDERS, STAGE_DATA, TRAIN_DONE, Context, caption_and_score,
                                  checked_training, cut_lines, discard_unfinished_trainings, loss_log, merge,
                                  run_folder, scored_checkpoint, setting_name, ship, steps, train_config, train_inputs,
                                  train_run, train_split, trainer_argv)
from hw3.data.tokenizer import BPETokenizer
from hw3 import REPO_ROOT

HERE = REPO_ROOT
STAGES = ("p1", "p2", "p3", "report")
OPTIONAL_STAGES = ("distill", "compare", "scst")  # run only when named in --with: GPU hours on the course's data
COMPARE_FIRST = ("compare", "distill", "scst")  # their order without the GPT-2: compare's best teaches, is fine-tuned
METHODS = ("adapter", "prefix", "lora")  # the report's three PEFT attempts
ABOUT = dict(p1="zero-shot on p1_data/val: accuracy, the report's three prompts + the ensemble, top-5 figure",
             p2="train %s, score each on val (CIDEr, CLIPScore, parameters, time), tune the best one's decoding, "
                "write OUT/p2/p2_best.{pt,json}",
             p3="attention figures of p3_data/images and of the best/worst val captions by CLIPScore",
             report="results.json, results.md, the report PDF",
             compare="train the classic captioners %s on P2's data and feature cache, score them beside the best "
                     "PEFT (CIDEr, BLEU-4, METEOR, ROUGE-L, CLIPScore), the attention-reg ablation",
             distill="p2_best captions the training images (precise, creative); a %s student trains on the human, "
                     "precise and creative captions, each scored on val",
             scst="self-critical fine-tuning of the best PEFT attempt or --scst-method's (CIDEr-D reward, %s), scored before and "
                  "after with the shipped decoding (CIDEr, CLIPScore, BLEU-4), the captions that changed most")
WITHOUT_GPT2 = dict(distill="the teacher, the compare stage's best architecture by CIDEr on val, captions the "
                            "training images (precise, creative); a %s student trains on the human, precise and "
                            "creative captions, each scored on val",
                    scst="self-critical fine-tuning of the compare stage's best architecture by CIDEr on val "
                         "(CIDEr-D reward, %s), scored before and after with the compare stage's decoding (CIDEr, "
                         "CLIPScore, BLEU-4), the captions that changed most")
TOP5_IMAGES = 3
CAPTIONED_FOLDERS = dict(train_images="train", val_images="val")  # image folder -> the split its captions name
CAPTION_PERCENTILE = 95  # results.json data.caption_tokens.p95
UNCUT = 10 ** 9  # a caption length no caption reaches: tokenize_captions cuts nothing
SHIP = ("checkpoints", "p2_best.pt")  # where hw3_2.sh looks, relative to the repository
STUDENT_ID = re.compile(r"^[A-Za-z0-9]+$")


# ----------------------------------------------------------------------------------------------- source

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
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = commit and subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return dict(data=ctx.args.data, command=command(ctx), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                device=ctx.device, gpu=gpu, versions=versions,
                git_commit=(commit + (" (with uncommitted changes)" if dirty else "")) if commit else None)


# ----------------------------------------------------------------------------------------------- checks first

def check_train_config(ctx: Context) -> None:
    """--train-config's entries name PEFT attempts of --methods, opt-in stages or compare runs: a misnamed entry
    fails first thing, in one line (run_context.train_config checks the file's form)."""
    config = train_config(ctx)
    unknown = sorted(set(config) - set(ctx.args.methods) - set(OPTIONAL_STAGES) - set(COMPARE_RUNS))
    if unknown:
        raise UserError("training config %s names %s, not among --methods %s (nor the stages %s, nor the compare "
                        "runs %s)" % (ctx.args.train_config, ", ".join(unknown), ",".join(ctx.args.methods),
                                      ", ".join(OPTIONAL_STAGES), ", ".join(COMPARE_RUNS)))


def check_train_options(ctx: Context) -> None:
    """Every --train-config entry through p2_train.py's own checks (argparse types, ranges, PEFT options), so a
    typo fails now, in one line, not after P1."""
    config = train_config(ctx)
    for method in ctx.args.methods:
        options = config.get(method, {})
        argv = train_argv(ctx, method, ctx.data("train_json")) + ["--out", run_folder(ctx, method, "new")]
        where = "--train-config %s: %s" % (ctx.args.train_config, method) if options else "p2_train.py --peft " + method
        ctx.train_options[method] = checked_training(ctx, argv, options, where)


def image_paths(ctx: Context, stages: List[str]) -> List[str]:
    """Every image the chosen stages read, found as p2_data finds them (a caption file's split where captions name
    the images, so its images are checked to exist and its captions to be readable), each once: train and val in
    one folder share no image, but a path is never listed twice."""
    keys = {k for s in stages for k in STAGE_DATA.get(s, ()) if k in IMAGE_FOLDERS}
    if {"p2", "compare", "scst"} & set(stages):
        keys |= set(CAPTIONED_FOLDERS)
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
        for key in STAGE_DATA.get(stage, ()):
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
    for name in OPTIONAL_STAGES:
        if name in stages:
            optional_stages.STAGES[name].check(ctx)
    check_images(images)


def length_summary(lengths: List[int]) -> dict:
    """min, median, 95th percentile (nearest rank) and max of caption lengths in tokens."""
    ordered = sorted(lengths)
    rank = max(1, math.ceil(CAPTION_PERCENTILE / 100 * len(ordered)))
    return dict(min=ordered[0], median=statistics.median(ordered), p95=ordered[rank - 1], max=ordered[-1])


def describe_data(ctx: Context) -> dict:
    """results.json "data" of a --captions run: the caption file's format, its split sizes, the training captions'
    lengths in GPT-2 tokens (as p2_train.py cleans and tokenizes them) and, per training, how many of them its
    --max-caption-tokens (given, or p2_train's default from these captions) cuts (p2_data.tokenize_captions' count)."""
    train, val = (caption_files.load_captions(ctx.args.captions, ctx.args.images, split=s) for s in ("train", "val"))
    tokens, _, _ = datasets.tokenize_captions(train.captions, BPETokenizer(), UNCUT)
    lengths = [len(t) for caps in tokens for t in caps]
    limits = {name: options.max_caption_tokens if isinstance(options.max_caption_tokens, int)
              else trainer.data_caption_tokens(max(lengths, default=0)) for name, options in ctx.train_options.items()}
    cut = {name: dict(max_caption_tokens=limit, cut=sum(1 for n in lengths if n > limit))
           for name, limit in limits.items()}
    return dict(format=caption_files.read_captions(ctx.args.captions).format,
                splits=dict(train=len(train.names), val=len(val.names)),
                caption_tokens=dict(length_summary(lengths), captions=len(lengths)), cut=cut)


# ----------------------------------------------------------------------------------------------- P1

def stage_p1(ctx: Context) -> dict:
    """One p1_clip_zeroshot.py run (one CLIP load, one image pass): the ensemble's p1/pred.{csv,eval.json}, the
    top-5 figure, and with --compare-prompts p1/pred.prompt_<set>.{csv,eval.json} for the report's three templates
    and the single prompt, and the table p1/pred.prompts.md."""
    csv_path = ctx.path("p1", "pred.csv")
    classify.main([ctx.data("p1_images"), ctx.data("id2label"), csv_path, "--evaluate", "--compare-prompts",
                           "--plot-top5", str(TOP5_IMAGES)] + ctx.p1_flags())
    ensemble = read_json(classify.sidecar(csv_path, ".eval.json"))

    compared = {key: read_json(classify.compared_path(csv_path, key, ".eval.json"))
                for key in [k for k, _ in prompt_templates.REPORT_TEMPLATES] + ["single"]}

    def accuracy(key: str) -> float:
        return compared[key]["accuracy"]

    prompts = [dict(templates=text, accuracy=accuracy(key)) for key, text in prompt_templates.REPORT_TEMPLATES]
    reference = prompt_templates.REPORT_TEMPLATES[0][0]  # 'This is a photo of {}': what the other two are set against
    for (key, _), row in zip(prompt_templates.REPORT_TEMPLATES[1:], prompts[1:]):
        row["paired"] = paired(compared[reference], compared[key])
    best = max((k for k, _ in prompt_templates.REPORT_TEMPLATES), key=accuracy)
    prompts.append(dict(templates="ensemble (%d templates)" % ensemble["n_templates"], accuracy=ensemble["accuracy"],
                        paired=paired(compared[best], ensemble)))
    return dict(p1_accuracy=ensemble["accuracy"], p1_single_prompt_accuracy=accuracy("single"), p1_prompts=prompts,
                p1_model="%s / %s" % (ensemble["model"], ensemble["pretrained"]),
                files=dict(p1_top5="p1/pred.top5.png", p1_prompts="p1/pred.prompts.md"),
                outputs=["p1/pred.csv", "p1/pred.eval.json"] + [
                    os.path.relpath(classify.compared_path(csv_path, key, suffix), ctx.out)
                    for key in [k for k, _ in prompt_templates.REPORT_TEMPLATES] + ["single"]
                    for suffix in (".csv", ".eval.json")])


def paired(reference: dict, other: dict) -> Optional[dict]:
    """Two evaluations of the same images, image by image: how many only `other` gets right (gained) and only
    `reference` does (lost), the counts the report's exact McNemar interval needs; None from an older p1."""
    a, b = reference.get("correct"), other.get("correct")
    if not a or not b or len(a) != len(b):
        return None
    return dict(n=len(a), gained=sum(x == "0" and y == "1" for x, y in zip(a, b)),
                lost=sum(x == "1" and y == "0" for x, y in zip(a, b)))


# ----------------------------------------------------------------------------------------------- P2

def train_argv(ctx: Context, method: str, train_json: str) -> List[str]:
    """p2_train.py's arguments for one attempt, without --out (the folder it trains in is run_all's choice)."""
    model = ["--decoder-weights", ctx.data("decoder"), "--peft", method]
    return trainer_argv(ctx, train_json, model, train_config(ctx).get(method, {}))


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
    row = dict(peft={k: meta["decoder"].get(k) for k in trainer.PEFT_OPTIONS.get(method, ())})
    args_file = os.path.join(os.path.dirname(checkpoint), "args.json")
    if not ctx.args.score_checkpoints and os.path.isfile(args_file):
        trained = read_json(args_file, "training arguments")
        row["training"] = {k: trained.get(k) for k in context.TRAINING_RECORD}
    elif isinstance(meta.get("training"), dict):
        row["training"] = dict(meta["training"])
    if "training" in row and "epoch" in meta:
        row["training"]["best_epoch"] = meta["epoch"]
    return row


def stage_p2(ctx: Context) -> dict:
    methods = ctx.args.methods
    grid = [dict(DECODE_DEFAULTS, **g) for g in context.DECODING_GRID]
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
                                       ctx.path("p2", "decoding", name + ".json"),
                                       clip)
            per_image[name] = scores["per_image"]
            bar.update(1)
        table.append(dict(settings, cider=scores["CIDEr"], clipscore=scores["CLIPScore"], cut=scores["cut"],
                          max_len=scores["max_len"]))
    best = max(range(len(table)), key=lambda i: (table[i]["cider"], -i))
    chosen = {k: table[best][k] for k in DECODE_DEFAULTS}
    chosen["chosen_on"] = "highest CIDEr on the val split (%s, %d images) among %d settings (run_all.py)" % (
        "%s, its val split" % os.path.basename(ctx.args.captions) if ctx.args.captions else DATA["val_json"],
        len(read_json(ctx.path("p2", method, "pred.json"))), len(grid))
    scores = per_image[setting_name(chosen)]
    if scores is None:
        scores = read_json(ctx.path("p2", method, "per_image.json"))
    write_json(ctx.path("p2", "p2_best.per_image.json"), scores)
    return table, chosen


# ----------------------------------------------------------------------------------------------- P3

def stage_p3(ctx: Context) -> dict:
    checkpoint = ctx.results["p2_shipping"]["checkpoint"]
    common = ["--checkpoint", checkpoint, "--decoder", ctx.data("decoder"), "--device", ctx.args.device]
    with steps(2, "p3") as bar:
        visualize.main(["--images", ctx.data("p3_images"), "--out", ctx.path("p3")] + common)
        bar.update(1)
        visualize.main(["--images", ctx.data("val_images"), "--out", ctx.path("p3", "best_worst"),
                           "--from-scores", ctx.path("p2", "p2_best.per_image.json"), "--top", "1", "--bottom", "1"]
                          + common)
        bar.update(1)
    figures = read_json(ctx.path("p3", "best_worst", "attention.json"))["figures"]
    return dict(p3_best_worst=[dict(image=e["image"], caption=e["caption"], clipscore=e["score"]) for e in figures],
                files=dict(p3_index="p3/index.md", p3_best_worst="p3/best_worst/attention.json"), outputs=["p3"])


# ----------------------------------------------------------------------------------------------- report

def results_table(results: dict) -> str:
    """results.md: a section for each stage that ran, none for those that did not."""
    measures = []
    for key in ("p1_accuracy", "p1_single_prompt_accuracy", "p1_heldout_accuracy", "p1_heldout_accuracy_all_classes"):
        if results.get(key) is not None:
            measures.append("| %s | %.4f |" % (key, results[key]))
    for p in results.get("p1_prompts", []):
        measures.append("| P1 prompt: %s | %.4f |" % (p["templates"].replace("|", "\\|"), p["accuracy"]))
    lines = ["| measure | value |", "| --- | --- |"] + measures if measures else []
    if results.get("data"):
        lines += ["", data_table(results["data"])]
    rows = results.get("p2") or {}
    if rows:
        extra = [k for k in ("object_f1", "exact_object_set") if all(k in r for r in rows.values())]
        train = (results.get("timings") or {}).get("p2_train", {})
        lines += ["", "| PEFT | CIDEr | CLIPScore | %strainable params | training s |" % "".join(
            k.replace("_", " ") + " | " for k in extra), "| --- " * (5 + len(extra)) + "|"]
        for method, r in rows.items():
            lines.append("| %s%s | %.4f | %.4f | %s%s | %s |" % (
                method, " (best)" if method == results.get("p2_best") else "", r["cider"], r["clipscore"],
                "".join("%.4f | " % r[k] for k in extra), "{:,}".format(r["trainable_params"]), train.get(method, "-")))
    if results.get("p2_decoding"):
        lines += ["", "| decoding of %s | CIDEr | CLIPScore |" % results.get("p2_best"), "| --- | --- | --- |"]
        for d in results["p2_decoding"]:
            lines.append("| %s | %.4f | %.4f |" % (setting_name(d), d["cider"], d["clipscore"]))
        lines += ["", "chosen: %s (%s)" % (setting_name(results["p2_inference"]), results["p2_inference"]["chosen_on"])]
    cuts = cut_lines(rows, "P2") + cut_lines({setting_name(d): d for d in results.get("p2_decoding") or []},
                                              "decoding")
    lines += [""] + cuts if cuts else []
    for e in results.get("p3_best_worst", []):
        lines += ["", "P3 %s: CLIPScore %.4f, \"%s\"" % (e["image"], e["clipscore"], e["caption"])]
    if results.get("distill"):
        lines += ["", distill_table(results["distill"])]
    if results.get("compare"):
        lines += ["", compare_table(results)]
    if results.get("attention"):
        lines += ["", attention_lines(results["attention"])]
    if results.get("scst"):
        lines += ["", scst_table(results["scst"])]
    if "pointing_game" in results:
        lines += ["", "attention pointing game: %s over %s shape words" % (
            "n/a" if results["pointing_game"] is None else "%.4f" % results["pointing_game"],
            results.get("pointing_trials"))]
    return "\n".join(lines).lstrip("\n") + "\n"


def data_table(data: dict) -> str:
    """A --captions run's data: format, splits, training caption lengths, what each training cut."""
    tokens = data["caption_tokens"]
    lines = ["| data: %s | train | val | caption tokens (GPT-2): min | median | p95 | max |" % data["format"],
             "| --- " * 7 + "|", "| images | %d | %d | %d | %g | %d | %d |" % (
                 data["splits"]["train"], data["splits"]["val"], tokens["min"], tokens["median"], tokens["p95"],
                 tokens["max"])]
    cut = ["%s %d of %d (at %d tokens)" % (name, c["cut"], tokens["captions"], c["max_caption_tokens"])
           for name, c in sorted((data.get("cut") or {}).items())]
    if cut:
        lines += ["", "training captions cut: " + "; ".join(cut)]
    return "\n".join(lines)


def attention_lines(attention: dict) -> str:
    """The best attentive architecture's attention figures and its best and worst val captions."""
    lines = ["attention maps of %s (the best attentive architecture), best and worst val images by %s: %s" % (
        attention["arch"], attention["ranked_by"], ", ".join(attention["figures"]))]
    for side in ("best", "worst"):
        c = attention[side]
        lines.append("- %s: %s, \"%s\" (CLIPScore %.4f, CIDEr %s)" % (
            side, c["image"], c["caption"], c["CLIPScore"], "-" if c.get("CIDEr") is None else "%.4f" % c["CIDEr"]))
    return "\n".join(lines)


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


# ----------------------------------------------------------------------------------------------- stages

def extra_stage(spec: str) -> Callable[[Context], dict]:
    """--extra-stage module:function -> the function (called with the Context; returns results to merge, and may
    name the files it wrote under "outputs", relative to OUT)."""
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError("--extra-stage %s: no function %r in module %r (%s)" % (spec, name, module, err)) from None
    return function


def stage_settings(ctx: Context, stage: str) -> dict:
    """What a stage's results depend on besides its input files: a finished stage whose settings, inputs and
    outputs are unchanged is skipped."""
    a = ctx.args
    if stage == "p1":
        return dict(flags=ctx.identity(ctx.p1_flags()))
    if stage == "p2":
        return dict(train=[ctx.identity(train_argv(ctx, m, "")) for m in a.methods],
                    train_max_images=a.train_max_images,
                    score_checkpoints=a.score_checkpoints, grid=context.DECODING_GRID)
    if stage == "p3":
        return dict(shipped=ctx.results.get("p2_shipping"), inference=ctx.results.get("p2_inference"))
    if stage in optional_stages.STAGES:
        return optional_stages.STAGES[stage].settings(ctx)
    upstream = {k: v for k, v in ctx.results.items() if k not in ("timings",)}  # the report and extra stages
    answers = {k: v for k, v in answer_file.read(ctx.out).items() if v} if stage == "report" else {}
    return dict(upstream=records.digest(ctx.portable(upstream)), stage=stage,
                student_id=a.student_id if stage == "report" else None,
                **({"answers": records.digest(answers)} if answers else {}))  # an edited answer rebuilds the report


def stage_inputs(ctx: Context, stage: str) -> Dict[str, Optional[str]]:
    """Fingerprints of what the stage reads: data named by their place in --data (<DATA>/p2_data/val.json), model
    files as given."""
    paths = [ctx.data(k) for k in STAGE_DATA.get(stage, ())]
    if stage != "report":
        paths += ctx.model_files()
    if stage == "p2" and ctx.args.score_checkpoints:
        paths += [p for m in ctx.args.methods for p in (scored_checkpoint(ctx, m),
                                                         config_path(scored_checkpoint(ctx, m)))]
    if stage in optional_stages.STAGES:
        paths += [p for c in optional_stages.STAGES[stage].scored(ctx) for p in (c, config_path(c))]
    if stage not in STAGES + OPTIONAL_STAGES:  # an extra stage reads the data folder its own way
        paths.append(ctx.args.data)
    paths += upstream_files(ctx, stage)
    return dict(ctx.portable(ctx.inputs(paths)), **upstream_outputs(ctx, stage))


# The earlier stages whose outputs a stage reads; the report and extra stages read every stage before them.
UPSTREAM = dict(p1=(), p2=(), p3=("p2",), distill=("p2",), compare=("p2",), scst=("p2",))


def upstream_outputs(ctx: Context, stage: str) -> Dict[str, Optional[str]]:
    """The outputs of the earlier stages this one reads, with the fingerprints their records hold (each checked by
    its own stage before this one runs), named <OUT>/...: a stage whose upstream changed is redone."""
    names = [s[0] for s in stage_list(ctx)]
    earlier = UPSTREAM.get(stage, tuple(names[:names.index(stage)]) if stage in names else ())
    if stage in ("distill", "scst") and not optional_stages.has_gpt2(ctx):  # they start from compare's best
        earlier += ("compare",)
    outputs = {}
    for name in earlier:
        try:
            record = records.read_record(ctx.out, name)
        except UserError:  # a damaged record: its own stage says so
            record = None
        if record and isinstance(record.get("outputs"), dict):
            outputs.update({"<OUT>/" + path: value for path, value in record["outputs"].items()})
    return outputs


def upstream_files(ctx: Context, stage: str) -> List[str]:
    """Files of earlier stages a stage reads besides their recorded outputs: the checkpoint (with its JSON) that
    scst fine-tunes, that distill's teacher and P3 use, whose row compare copies (each may be a --score-checkpoints
    one); for the report and extra stages, every file the results so far name."""
    results, checkpoints = ctx.results, []
    if stage in ("p3", "distill") and results.get("p2_shipping"):
        checkpoints.append(results["p2_shipping"]["checkpoint"])
    method = optional_stages.scst_method(ctx) if stage == "scst" else results.get("p2_best")
    if stage in ("scst", "compare") and method and method in (results.get("p2") or {}):
        checkpoints.append(results["p2"][method]["checkpoint"])
    best = optional_stages.compare_best(ctx)
    if stage in ("distill", "scst") and not optional_stages.has_gpt2(ctx) and best:  # compare's best teaches, tunes
        checkpoints.append(results["compare"][best]["checkpoint"])
    if stage not in STAGES + OPTIONAL_STAGES or stage == "report":
        checkpoints += named_files(results)
    return sorted({p for c in checkpoints for p in (c, config_path(c)) if os.path.isfile(p)})


def named_files(obj) -> List[str]:
    """The existing files a results fragment names, at any depth."""
    if isinstance(obj, str):
        return [obj] if os.path.isfile(obj) else []
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [p for v in values for p in named_files(v)]


def stage_list(ctx: Context) -> List[tuple]:
    """(name, function, description) in running order; the opted-in stages (--with), then the extra stages, before
    the report."""
    stages = [("p1", stage_p1, ABOUT["p1"]), ("p2", stage_p2, ABOUT["p2"] % ", ".join(ctx.args.methods)),
              ("p3", stage_p3, ABOUT["p3"])]
    texts = ABOUT if optional_stages.has_gpt2(ctx) else dict(ABOUT, **WITHOUT_GPT2)
    about = dict(distill=texts["distill"] % ctx.args.student_arch, compare=texts["compare"] % ", ".join(COMPARE_RUNS),
                 scst=texts["scst"] % ", ".join("%s %s" % (k, v) for k, v in scst_options(ctx).items()))
    order = OPTIONAL_STAGES if optional_stages.has_gpt2(ctx) else COMPARE_FIRST
    stages += [(name, optional_stages.STAGES[name].run, about[name]) for name in order
               if name in ctx.args.with_stages]
    if ctx.args.captions:  # another dataset: no P1 or P3 data; P2 needs the GPT-2 weights
        stages = [s for s in stages if s[0] not in ("p1", "p3") and (s[0] != "p2" or ctx.args.decoder_weights)]
    for spec in ctx.args.extra_stage:
        function = extra_stage(spec)
        stages.append((spec, function, (function.__doc__ or "").strip().split("\n")[0]))
    return stages + [("report", stage_report, ABOUT["report"])]


def run_stage(ctx: Context, name: str, function, selected: bool) -> None:
    record = records.read_record(ctx.out, name)
    settings = json.loads(json.dumps(ctx.portable(stage_settings(ctx, name))))
    inputs = stage_inputs(ctx, name)
    why = records.why_rerun(record, ctx.out, settings, inputs)
    if not selected:
        if record and why is None:
            merge(ctx.results, ctx.local(record["results"]))
        elif record:
            ctx.say("%s: not selected; its earlier results are left out (%s)" % (name, why), stage=name)
        return
    if why is None and not ctx.forced(name):
        ctx.say("%s: %s, skipping" % (name, records.skip_line(record)), stage=name, skipped=True)
        merge(ctx.results, ctx.local(record["results"]))
        if name == "p2":
            discard_unfinished_trainings(ctx)
        if name in optional_stages.STAGES:
            trainings = optional_stages.STAGES[name].trainings
            discard_unfinished_trainings(ctx, name, None if trainings is None else list(trainings))
        return
    if ctx.forced(name):
        why = "forced (--force %s): redone from its start%s" % (
            name, "; the earlier outputs stay until the new ones are written" if record else "")
    ctx.say("%s: %s" % (name, "starting" if record is None else "running again: " + why), stage=name)
    ctx.stage = name
    started = time.time()
    fragment = function(ctx) or {}
    seconds = round(time.time() - started, 1)
    outputs = list(fragment.pop("outputs", [])) + list((fragment.get("files") or {}).values())
    merge(fragment, dict(timings=dict(stages={name: seconds})))
    merge(ctx.results, fragment)
    records.write_record(ctx.out, name, settings, inputs, sorted(set(outputs)), seconds, ctx.portable(fragment))
    ctx.log(event="stage done", stage=name, seconds=seconds)
    ctx.say("%s: done in %.0f s" % (name, seconds))


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
    ctx.log(event="plan", command=command(ctx), stages=[s[0] for s in stages], selected=selected)


def install(ctx: Context) -> None:
    shipping = ctx.results.get("p2_shipping")
    if not shipping:
        raise UserError("--install needs P2's results in %s: run the p2 stage first" % ctx.out)
    for path in (shipping["checkpoint"], shipping["config"]):
        if not os.path.isfile(path):
            raise UserError("--install: %s is missing; run the p2 stage again (drop --only, or add p2 to it)" % path)
    dest = os.path.join(HERE, *SHIP)
    for src, dst in ((shipping["checkpoint"], dest), (shipping["config"], config_path(dest))):
        with atomic_write(dst, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    print("installed %s and %s" % (os.path.relpath(dest), os.path.relpath(config_path(dest))))


def shipping_note(shipping: dict) -> str:
    dest = os.path.join(*SHIP)
    return ("to ship the best captioner: copy %s -> %s and %s -> %s (or rerun with --install); or upload "
            "p2_best.pt, commit its JSON as %s and set RELEASE in hw3_download.py: sha256=%r, bytes=%d"
            % (shipping["checkpoint"], dest, shipping["config"], config_path(dest), config_path(dest),
               shipping["sha256"], shipping["bytes"]))


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--data", help="the course's hw3_data folder (p1_data, p2_data, p3_data)")
    g.add_argument("--out", required=True, help="output folder (results, figures, checkpoints, stage records)")
    g.add_argument("--only", help="comma list of stages to run (%s, or an --extra-stage); the others' earlier "
                   "results are kept while still true" % ", ".join(STAGES))
    g.add_argument("--force", action="append", default=[], help="redo this stage from its start, a training "
                   "included, even if finished (repeatable; comma lists too)")
    g.add_argument("--install", action="store_true", help="copy the best captioner to checkpoints/p2_best.{pt,json}")
    g.add_argument("--with", dest="with_stages", default="", metavar="STAGE,...", help="opt-in stages to run too "
                   "(%s); each costs GPU hours on the course's data (README)" % ", ".join(OPTIONAL_STAGES))
    g.add_argument("--extra-stage", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a stage of your own, run before the report: FUNCTION(context) returns results to merge")
    g.add_argument("--student-id", help="your student ID: the report is written as OUT/hw3_<ID>.pdf with the ID on "
                   "its title page, as the course asks")
    g = p.add_argument_group("another dataset instead of --data: the P2, compare and report stages")
    g.add_argument("--captions", metavar="FILE", help="one caption file of any format p2_data reads (COCO, Karpathy "
                   "split JSON, DeepFashion-MultiModal captions.json, {file name: captions}): trained on its train "
                   "split, scored on its val split (a file without splits: divided by file-name hash, %g to val, as "
                   "p2_train.py does)" % caption_files.VAL_FRACTION)
    g.add_argument("--images", metavar="DIR", help="the folder of --captions' images")
    g.add_argument("--decoder-weights", metavar="FILE", help="the course's decoder_model.bin, for the P2 (GPT-2 "
                   "PEFT) stage; without it only the compare stage's from-scratch decoders are trained")
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
    g = p.add_argument_group("distill (--with distill): seed 004 section 4, p2_best as the teacher")
    g.add_argument("--student-arch", default="gru", choices=tuple(ARCHITECTURES), help="the student's p2_train.py "
                   "--arch (default %(default)s, the smallest); its training options: --train-config's \"distill\" "
                   "entry")
    g.add_argument("--teacher-captions", type=int, default=1, help="teacher captions per training image (default "
                   "%(default)s; precise ones are the best beams, so at most its beam size)")
    g.add_argument("--score-students", metavar="DIR", help="score DIR/distill_{human,precise,creative}.pt instead of "
                   "the students' best.pt (the demo scores its converged students; the trainings still run)")
    g = p.add_argument_group("scst (--with scst): self-critical fine-tuning (issue 22)")
    g.add_argument("--scst", action="store_true", help="run the scst stage too (the same as --with scst)")
    g.add_argument("--scst-method", help="the PEFT attempt to fine-tune (default: P2's best by CIDEr); its options: "
                   "--train-config's \"scst\" entry")
    g = p.add_argument_group("models (defaults: the scripts' own)")
    g.add_argument("--p1-model", help="P1's CLIP (p1_clip_zeroshot.py --model)")
    g.add_argument("--p1-pretrained", help="P1's CLIP weights (p1_clip_zeroshot.py --pretrained)")
    g.add_argument("--clip-model", help="CLIP for CLIPScore (default %s)" % clip_backend.CLIPSCORE_CLIP[0])
    g.add_argument("--clip-pretrained", help="its weights (default %s)" % clip_backend.CLIPSCORE_CLIP[1])
    g.add_argument("--encoder", help="P2's frozen ViT (p2_train.py --encoder)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in trainer.PEFT_METHODS]
    if bad or not args.methods:
        raise UserError("--methods: %s is not a PEFT method (%s)" % (",".join(bad) or "(none)",
                                                                    ", ".join(trainer.PEFT_METHODS)))
    if len(set(args.methods)) != len(args.methods):
        raise UserError("--methods names a method twice: %s" % ",".join(args.methods))
    if bool(args.clip_model) != bool(args.clip_pretrained):
        raise UserError("--clip-model and --clip-pretrained go together")
    check_data_options(args)
    if args.workers < 0 or args.train_max_images < 0:
        raise UserError("--workers and --train-max-images must be 0 or more")
    if args.student_id is not None and not STUDENT_ID.match(args.student_id):
        raise UserError("--student-id %r: letters and digits only (e.g. r12345678)" % args.student_id)
    args.force = [s.strip() for f in args.force for s in f.split(",") if s.strip()]
    if args.scst:
        args.with_stages = ",".join([args.with_stages, "scst"])
    args.with_stages = list(dict.fromkeys(s.strip() for s in args.with_stages.split(",") if s.strip()))
    unknown = [s for s in args.with_stages if s not in OPTIONAL_STAGES]
    if unknown:
        raise UserError("--with %s: not an opt-in stage (%s)" % (",".join(unknown), ", ".join(OPTIONAL_STAGES)))
    if args.with_stages and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--with %s trains on one process: run it without torchrun" % ",".join(args.with_stages))
    if args.scst_method is not None and args.captions and not args.decoder_weights:
        raise UserError("--scst-method %s names a PEFT attempt, which needs --decoder-weights; without it the scst "
                        "stage fine-tunes the compare stage's best architecture" % args.scst_method)
    if args.scst_method is not None and args.scst_method not in args.methods:
        raise UserError("--scst-method %s is not among --methods %s" % (args.scst_method, ",".join(args.methods)))
    if args.teacher_captions < 1:
        raise UserError("--teacher-captions must be 1 or more, got %d" % args.teacher_captions)
    return args


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
            raise UserError("--train-max-images works with --data only (a --captions file is split by p2_data)")
        args.data = args.images  # <DATA> in records: the image folder
        args.with_stages = ",".join([args.with_stages, "compare"])
        return
    if args.decoder_weights:
        raise UserError("--decoder-weights goes with --captions (--data has p2_data/decoder_model.bin)")
    if not args.data or not os.path.isdir(args.data):
        raise UserError("--data %s is not a folder (the course's hw3_data)" % args.data)


def no_compare_line(stage: str, out: str, which: str = "") -> str:
    return ("%s without --decoder-weights starts from the compare stage's best architecture, but %s has no finished "
            "compare stage%s: add compare to --only (or give --decoder-weights)" % (stage, out, " " + which if which
                                                                                   else ""))


def check_best_captioner(ctx: Context, selected: List[str]) -> None:
    """Without the GPT-2, distill and scst start from the compare stage's best architecture: compare runs in this
    command or finished earlier; else one line before any work."""
    for stage in ("distill", "scst"):
        if stage in selected and not optional_stages.has_gpt2(ctx) and "compare" not in selected \
                and records.read_record(ctx.out, "compare") is None:
            raise UserError(no_compare_line(stage, ctx.out))


def choose_stages(ctx: Context, names: List[str]) -> List[str]:
    """The stages to run: --only's (all by default); --force of a stage not run is refused, not ignored."""
    args = ctx.args
    selected = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(names)
    for name in selected + args.force:
        if name in OPTIONAL_STAGES and name not in names:
            raise UserError("stage %s is opt-in: add --with %s" % (name, name))
        if name not in names:
            raise UserError("no stage %r (the stages: %s)" % (name, ", ".join(names)))
    left_out = [s for s in args.force if s not in selected]
    if left_out:
        raise UserError("--force %s: not among the stages to run (--only %s); add it to --only"
                        % (",".join(left_out), args.only))
    return selected


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # missing weights fail at once (hw3_download.sh fetches them)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    ctx = Context(args, argv)
    check_train_config(ctx)
    stages = stage_list(ctx)
    selected = choose_stages(ctx, [s[0] for s in stages])
    if ctx.rank != 0:  # under torchrun: the other ranks join each training and leave the rest to rank 0
        if "p2" in selected:
            check_train_options(ctx)
            train_json = train_split(ctx)
            for method in args.methods:
                train_method(ctx, method, train_json)
        return 0
    records.check_out_folder(ctx.out)
    check_best_captioner(ctx, selected)
    check_inputs(ctx, selected)
    os.makedirs(ctx.out, exist_ok=True)  # only now: a refused run leaves no OUT behind
    if args.captions:
        ctx.results["data"] = describe_data(ctx)
    with records.RunLock(ctx.out, command(ctx)):
        removed = records.remove_temporaries(ctx.out)
        if removed:
            ctx.say("removed %d temporary file(s) of an interrupted run: %s" % (len(removed), ", ".join(removed[:5])))
        print_plan(ctx, stages, selected)
        started = time.time()
        for name, function, _ in stages:
            if name in ("p3", "distill", "compare", "scst") and name in selected and "p2_shipping" not in ctx.results \
                    and "p2" in [s[0] for s in stages]:
                raise UserError("%s uses P2's best captioner, but %s has no finished p2 stage that is still true: "
                                "add p2 to --only" % (name, ctx.out))
            if name in ("distill", "scst") and name in selected and not optional_stages.has_gpt2(ctx) \
                    and "compare" not in ctx.results:
                raise UserError(no_compare_line(name, ctx.out, "that is still true"))
            run_stage(ctx, name, function, name in selected)
        if ctx.results.get("p2_shipping"):
            print(shipping_note(ctx.results["p2_shipping"]))
        if args.install:
            install(ctx)
    print("run_all: %s in %.0f s (results in %s)" % (", ".join(selected), time.time() - started, ctx.out))
    return 0


if __name__ == "__main__":
    run_main(main)
