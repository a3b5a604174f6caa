"""The whole homework in one command, on the course's data layout, resumable stage by stage.

    python3 run_all.py --data hw3_data --out outputs/hw3            # P1, P2 (three PEFT attempts), P3, the report
    python3 run_all.py --data hw3_data --out outputs/hw3 --install  # ... and copy the best captioner to checkpoints/
    torchrun --nproc_per_node 2 run_all.py --data hw3_data --out outputs/hw3   # training on two GPUs (DDP)

DATA holds p1_data/val/{label}_{id}.png + p1_data/id2label.json, p2_data/images/{train,val}/ + p2_data/train.json +
p2_data/val.json + p2_data/decoder_model.bin, p3_data/images/. The stages:

  p1      zero-shot classification with accuracy, the report's three prompts and the ensemble, the top-5 figure
  p2      train each PEFT attempt (one shared feature cache; an interrupted training resumes), score each on val
          (CIDEr, CLIPScore, trainable parameters, time), pick the best by CIDEr, tune its decoding on val, write
          the shippable checkpoint OUT/p2/p2_best.{pt,json} with the chosen decoding under "inference"
  p3      attention figures of p3_data/images, and of the best and worst validation captions by CLIPScore
  report  results.json (with the command), results.md, report.pdf (make_report.py)

Each finished stage leaves a marker with its settings in OUT/stages/; the same command run again skips it (saying
so); --force STAGE reruns one, --only runs some. Progress goes to stderr, one log (JSONL) to OUT/run_all.log.

This file is the pipeline, not a module: it calls the scripts' main() functions in this process (p1_clip_zeroshot,
p2_train, p2_inference, p3_visualize) and make_report.build, so every number comes from the code a student would
run by hand. No module imports it; the offline demo (miniworld/demo.py) runs it and adds the world-only measures
with --extra-stage.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shlex
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional

import clip_utils
import make_report
import metrics
import p1_clip_zeroshot
import p1_templates
import p2_data
import p2_inference
import p2_train
import p3_visualize
import search
from captioner import config_path, read_checkpoint_config
from common import (UserError, atomic_write, file_sha256, list_images, progress, read_json, resolve_device, run_main,
                    write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("p1", "p2", "p3", "report")
METHODS = ("adapter", "prefix", "lora")  # the report's three PEFT attempts
DATA = dict(p1_images="p1_data/val", id2label="p1_data/id2label.json", train_images="p2_data/images/train",
            val_images="p2_data/images/val", train_json="p2_data/train.json", val_json="p2_data/val.json",
            decoder="p2_data/decoder_model.bin", p3_images="p3_data/images")
STAGE_DATA = dict(p1=("p1_images", "id2label"), p2=("train_images", "val_images", "train_json", "val_json", "decoder"),
                  p3=("p3_images", "val_images", "decoder"), report=())
ABOUT = dict(p1="zero-shot on p1_data/val: accuracy, the report's three prompts + the ensemble, top-5 figure",
             p2="train %s, score each on val (CIDEr, CLIPScore, parameters, time), tune the best one's decoding, "
                "write OUT/p2/p2_best.{pt,json}",
             p3="attention figures of p3_data/images and of the best/worst val captions by CLIPScore",
             report="results.json, results.md, report.pdf")
# Decoding settings tried on the best attempt; the README default comes first, so a tie keeps it.
DECODING_GRID = (dict(method="beam", beam_size=3, length_penalty=1.0), dict(method="greedy", beam_size=1),
                 dict(method="beam", beam_size=5, length_penalty=1.0), dict(method="beam", beam_size=3, length_penalty=0.6),
                 dict(method="beam", beam_size=5, length_penalty=1.4))
TOP5_IMAGES = 3
STAGE_DIR = "stages"
SHIP = ("checkpoints", "p2_best.pt")  # where hw3_2.sh looks, relative to the repository


# ----------------------------------------------------------------------------------------------- context

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def merge(into: dict, fragment: dict) -> dict:
    """Nested dicts merged key by key (a later stage adds measures to an earlier stage's rows)."""
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


class Context:
    """What every stage reads: the arguments, the paths, the device, the results so far; and how to say things."""

    def __init__(self, args: argparse.Namespace, argv: List[str]):
        self.args, self.argv = args, argv
        self.out = args.out
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = str(resolve_device(args.device))
        self.results: Dict[str, object] = {}
        self.log_path = os.path.join(self.out, "run_all.log")

    def data(self, key: str) -> str:
        return os.path.join(self.args.data, DATA[key])

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def log(self, **record) -> None:
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(time=round(time.time(), 1), **record)) + "\n")

    def say(self, text: str, **record) -> None:
        print("== " + text, file=sys.stderr, flush=True)
        self.log(event="say", text=text, **record)

    def p1_flags(self) -> List[str]:
        """P1's model and runtime flags, for every p1_clip_zeroshot.py run (an extra stage's too)."""
        flags = ["--device", self.device, "--workers", str(self.args.workers)]
        if self.args.p1_model:
            flags += ["--model", self.args.p1_model]
        if self.args.p1_pretrained:
            flags += ["--pretrained", self.args.p1_pretrained]
        return flags


def steps(total: int, stage: str):
    return progress(total=total, desc="stage %s" % stage, unit="step", position=None)


# ----------------------------------------------------------------------------------------------- data check

def check_data(ctx: Context, stages: List[str]) -> None:
    """Every input the chosen stages read, checked before any work: one line naming what is wrong."""
    for stage in stages:
        for key in STAGE_DATA.get(stage, ()):
            path = ctx.data(key)
            if not os.path.exists(path):
                raise UserError("--data %s has no %s (stage %s needs it; the course's layout: %s)"
                                % (ctx.args.data, DATA[key], stage, ", ".join(sorted(set(DATA.values())))))
    if "p1" in stages:
        names = list_images(ctx.data("p1_images"), "P1 image folder")
        classes = p1_clip_zeroshot.read_id2label(ctx.data("id2label"))
        p1_clip_zeroshot.labels_from_names(names, len(classes), "%s against %s" % (ctx.data("p1_images"),
                                                                                   ctx.data("id2label")))
    if "p2" in stages:
        for split in ("train", "val"):
            p2_data.load_captions(ctx.data(split + "_json"), ctx.data(split + "_images"))
        if ctx.args.score_checkpoints:
            for method in ctx.args.methods:
                scored_checkpoint(ctx, method)
    if "p3" in stages:
        list_images(ctx.data("p3_images"), "P3 image folder")


# ----------------------------------------------------------------------------------------------- P1

def stage_p1(ctx: Context) -> dict:
    """One p1_clip_zeroshot.py run (one CLIP load, one image pass): the ensemble's p1/pred.{csv,eval.json}, the
    top-5 figure, and with --compare-prompts p1/pred.prompt_<set>.{csv,eval.json} for the report's three templates
    and the single prompt, and the table p1/pred.prompts.md."""
    csv_path = ctx.path("p1", "pred.csv")
    p1_clip_zeroshot.main([ctx.data("p1_images"), ctx.data("id2label"), csv_path, "--evaluate", "--compare-prompts",
                           "--plot-top5", str(TOP5_IMAGES)] + ctx.p1_flags())
    ensemble = read_json(p1_clip_zeroshot.sidecar(csv_path, ".eval.json"))

    def accuracy(key: str) -> float:
        return read_json(p1_clip_zeroshot.compared_path(csv_path, key, ".eval.json"))["accuracy"]

    prompts = [dict(templates=text, accuracy=accuracy(key)) for key, text in p1_templates.REPORT_TEMPLATES]
    prompts.append(dict(templates="ensemble (%d templates)" % ensemble["n_templates"], accuracy=ensemble["accuracy"]))
    return dict(p1_accuracy=ensemble["accuracy"], p1_single_prompt_accuracy=accuracy("single"), p1_prompts=prompts,
                p1_model="%s / %s" % (ensemble["model"], ensemble["pretrained"]),
                files=dict(p1_top5="p1/pred.top5.png", p1_prompts="p1/pred.prompts.md"))


# ----------------------------------------------------------------------------------------------- P2

def train_config(ctx: Context) -> Dict[str, dict]:
    """Per-attempt p2_train.py options from --train-config: {"lora": {"lr": 5e-4, "epochs": 8}, ...}."""
    if not ctx.args.train_config:
        return {}
    config = read_json(ctx.args.train_config, "training config")
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise UserError("training config %s must be {method: {p2_train.py option: value}}, e.g. "
                        "{\"lora\": {\"lr\": 0.0005, \"epochs\": 8}}" % ctx.args.train_config)
    unknown = sorted(set(config) - set(ctx.args.methods))
    if unknown:
        raise UserError("training config %s names %s, not among --methods %s"
                        % (ctx.args.train_config, ", ".join(unknown), ",".join(ctx.args.methods)))
    return config


def option_flags(options: dict) -> List[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (False, None):
            flags += [flag, ",".join(str(v) for v in value) if isinstance(value, list) else str(value)]
    return flags


def train_split(ctx: Context) -> str:
    """train.json, or its first --train-max-images images (a smoke run) written into OUT."""
    if not ctx.args.train_max_images:
        return ctx.data("train_json")
    data = read_json(ctx.data("train_json"), "annotation file")
    keep = {img["id"] for img in data["images"][:ctx.args.train_max_images]}
    data = dict(data, images=[i for i in data["images"] if i["id"] in keep],
                annotations=[a for a in data["annotations"] if a["image_id"] in keep])
    path = ctx.path("p2", "train_subset.json")
    write_json(path, data, indent=None)
    return path


def train_argv(ctx: Context, method: str, train_json: str) -> List[str]:
    argv = ["--train-json", train_json, "--train-images", ctx.data("train_images"), "--val-json", ctx.data("val_json"),
            "--val-images", ctx.data("val_images"), "--decoder-weights", ctx.data("decoder"), "--peft", method,
            "--workers", str(ctx.args.workers), "--device", ctx.args.device, "--out", ctx.path("p2", method, "train")]
    if ctx.args.encoder:
        argv += ["--encoder", ctx.args.encoder]
    if ctx.args.clip_model:
        argv += ["--clip-model", ctx.args.clip_model, "--clip-pretrained", ctx.args.clip_pretrained]
    if not ctx.args.no_feature_cache:
        argv += ["--feature-cache", ctx.path("p2", "feature_cache")]
    return argv + option_flags(train_config(ctx).get(method, {}))


def train_method(ctx: Context, method: str, train_json: str) -> float:
    """One p2_train.py run: skipped when finished with the same arguments, resumed (--resume) when interrupted,
    started afresh when the arguments changed. Returns its seconds (as measured then, when skipped)."""
    argv = train_argv(ctx, method, train_json)
    run_dir = ctx.path("p2", method, "train")
    started_with, finished = ctx.path("p2", method, "train_args.json"), ctx.path("p2", method, "train_done.json")
    if os.path.isfile(finished) and read_json(finished).get("argv") == argv:
        ctx.say("p2: %s training finished earlier with these settings, skipping" % method)
        return float(read_json(finished).get("seconds", 0.0))
    resume = os.path.isfile(started_with) and read_json(started_with) == argv and \
        os.path.isfile(os.path.join(run_dir, "last_state.pt"))
    if resume:
        ctx.say("p2: %s training was interrupted: resuming it (p2_train.py --resume)" % method)
    else:
        if os.path.isdir(run_dir) and ctx.rank == 0:
            ctx.say("p2: %s: an earlier training with other settings is replaced" % method)
            shutil.rmtree(run_dir)
        if ctx.rank == 0:
            write_json(started_with, argv)
        ctx.say("p2: training %s (p2_train.py %s)" % (method, " ".join(shlex.quote(a) for a in argv)))
    started = time.time()
    p2_train.main(argv + (["--resume"] if resume else []))
    seconds = time.time() - started
    if ctx.rank == 0:
        write_json(finished, dict(argv=argv, seconds=round(seconds, 1)))
    return seconds


def loss_curve(ctx: Context, method: str) -> List[List[float]]:
    log = ctx.path("p2", method, "train", "log.jsonl")
    with open(log, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [[line["step"], line["loss"]] for line in lines if "loss" in line and "step" in line]


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


def scored_checkpoint(ctx: Context, method: str) -> str:
    """The checkpoint whose captions are scored: the training's best.pt, or --score-checkpoints DIR/p2_METHOD.pt."""
    if not ctx.args.score_checkpoints:
        return ctx.path("p2", method, "train", "best.pt")
    path = os.path.join(ctx.args.score_checkpoints, "p2_%s.pt" % method)
    if not os.path.isfile(path) or not os.path.isfile(config_path(path)):
        raise UserError("--score-checkpoints %s has no p2_%s.pt with its .json" % (ctx.args.score_checkpoints, method))
    return path


def decoding_flags(settings: dict) -> List[str]:
    """Every setting as a flag (so a checkpoint's own recommendation never enters a score); greedy takes no beam
    flags."""
    flags = ["--method", settings["method"], "--max-len", str(settings["max_len"]), "--no-repeat-ngram",
             str(settings["no_repeat_ngram"])]
    if settings["method"] == "beam":
        flags += ["--beam-size", str(settings["beam_size"]), "--length-penalty", str(settings["length_penalty"])]
    return flags


def caption_and_score(ctx: Context, checkpoint: str, settings: dict, pred: str, clip) -> dict:
    """p2_inference.py (hw3_2.sh's code) with explicit decoding settings, then metrics.evaluate (p2_evaluate.py's
    scoring) with the CLIP loaded once."""
    p2_inference.main([ctx.data("val_images"), pred, ctx.data("decoder"), "--checkpoint", checkpoint, "--device",
                       ctx.args.device, "--num-workers", str(ctx.args.workers)] + decoding_flags(settings))
    return metrics.evaluate(read_json(pred), ctx.data("val_json"), ctx.data("val_images"), clip=clip,
                            device=ctx.device)


def setting_name(settings: dict) -> str:
    if settings["method"] == "greedy":
        return "greedy"
    return "beam%d_lp%g" % (settings["beam_size"], settings["length_penalty"])


def stage_p2(ctx: Context) -> dict:
    methods = ctx.args.methods
    grid = [dict(search.DECODE_DEFAULTS, **g) for g in DECODING_GRID]
    with steps(3 * len(methods) + len(grid) - 1, "p2") as bar:
        train_json = train_split(ctx)
        train_seconds = {}
        for n, method in enumerate(methods):
            train_seconds[method] = round(train_method(ctx, method, train_json), 1)
            bar.update(2)
            if n == 0 and len(methods) > 1:
                ctx.say("p2: %s took %.0f s: about %.0f s more for the other %d attempt(s)"
                        % (method, train_seconds[method], train_seconds[method] * (len(methods) - 1), len(methods) - 1))
        curves = {m: loss_curve(ctx, m) for m in methods}
        plot_curves(curves, ctx.path("p2", "loss_curves.png"))
        clip = clip_utils.load_clip(ctx.args.clip_model or clip_utils.CLIPSCORE_CLIP[0],
                                    ctx.args.clip_pretrained or clip_utils.CLIPSCORE_CLIP[1], ctx.device)
        rows, eval_seconds = {}, {}
        for method in methods:
            started = time.time()
            checkpoint = scored_checkpoint(ctx, method)
            ctx.say("p2: scoring %s (%s) on val" % (method, checkpoint))
            scored = caption_and_score(ctx, checkpoint, grid[0], ctx.path("p2", method, "pred.json"), clip)
            write_json(ctx.path("p2", method, "per_image.json"), scored["per_image"])
            meta = read_checkpoint_config(checkpoint)
            rows[method] = dict(cider=scored["CIDEr"], clipscore=scored["CLIPScore"],
                                trainable_params=meta["trainable_parameters"], checkpoint=checkpoint,
                                settings=meta.get("settings") or {k: v for k, v in meta["decoder"].items()
                                                                  if v not in (0, None, False)})
            eval_seconds[method] = round(time.time() - started, 1)
            bar.update(1)
        best = max(methods, key=lambda m: rows[m]["cider"])
        started = time.time()
        table, chosen = tune_decoding(ctx, best, rows[best], grid, clip, bar)
        decoding_seconds = round(time.time() - started, 1)
        shipping = ship(ctx, rows[best]["checkpoint"], chosen)
    return dict(p2=rows, p2_best=best, p2_train_loss={m: [c[0][1], c[-1][1]] if c else None for m, c in curves.items()},
                p2_decoding=table, p2_inference=chosen, p2_shipping=shipping,
                timings=dict(p2_train=train_seconds, p2_evaluate=eval_seconds, p2_decoding=decoding_seconds),
                files=dict(p2_loss_curves="p2/loss_curves.png"))


def tune_decoding(ctx: Context, method: str, row: dict, grid: List[dict], clip, bar):
    """Each decoding setting of the grid on val with the best attempt; the highest CIDEr wins (ties keep the
    earlier, the README default first). Returns the table and the chosen settings with "chosen_on"."""
    table, per_image = [], {}
    for n, settings in enumerate(grid):
        name = setting_name(settings)
        if n == 0:  # the README default: the attempt's own row
            scores = dict(CIDEr=row["cider"], CLIPScore=row["clipscore"])
            per_image[name] = None
        else:
            ctx.say("p2: decoding %s" % name)
            scores = caption_and_score(ctx, row["checkpoint"], settings, ctx.path("p2", "decoding", name + ".json"),
                                       clip)
            per_image[name] = scores["per_image"]
            bar.update(1)
        table.append(dict(settings, cider=scores["CIDEr"], clipscore=scores["CLIPScore"]))
    best = max(range(len(table)), key=lambda i: (table[i]["cider"], -i))
    chosen = {k: table[best][k] for k in search.DECODE_DEFAULTS}
    chosen["chosen_on"] = "highest CIDEr on %s (%d images) among %d settings (run_all.py)" % (
        ctx.data("val_json"), len(read_json(ctx.path("p2", method, "pred.json"))), len(grid))
    scores = per_image[setting_name(chosen)]
    if scores is None:
        scores = read_json(ctx.path("p2", method, "per_image.json"))
    write_json(ctx.path("p2", "p2_best.per_image.json"), scores)
    return table, chosen


def ship(ctx: Context, checkpoint: str, chosen: dict) -> dict:
    """OUT/p2/p2_best.{pt,json}: the best checkpoint with its chosen decoding under "inference" (checked as
    hw3_2.sh will read it), and what RELEASE in hw3_download.py needs."""
    dest = ctx.path("p2", "p2_best.pt")
    with atomic_write(dest, "wb") as f, open(checkpoint, "rb") as src:
        shutil.copyfileobj(src, f)
    meta = dict(read_checkpoint_config(checkpoint), **{search.INFERENCE_KEY: chosen})
    search.resolve_decoding({}, meta, config_path(dest))  # raises if hw3_2.sh could not use it
    write_json(config_path(dest), meta)
    return dict(checkpoint=dest, config=config_path(dest), sha256=file_sha256(dest), bytes=os.path.getsize(dest))


# ----------------------------------------------------------------------------------------------- P3

def stage_p3(ctx: Context) -> dict:
    checkpoint = ctx.results["p2_shipping"]["checkpoint"]
    common = ["--checkpoint", checkpoint, "--decoder", ctx.data("decoder"), "--device", ctx.args.device]
    with steps(2, "p3") as bar:
        p3_visualize.main(["--images", ctx.data("p3_images"), "--out", ctx.path("p3")] + common)
        bar.update(1)
        p3_visualize.main(["--images", ctx.data("val_images"), "--out", ctx.path("p3", "best_worst"),
                           "--from-scores", ctx.path("p2", "p2_best.per_image.json"), "--top", "1", "--bottom", "1"]
                          + common)
        bar.update(1)
    figures = read_json(ctx.path("p3", "best_worst", "attention.json"))["figures"]
    return dict(p3_best_worst=[dict(image=e["image"], caption=e["caption"], clipscore=e["score"]) for e in figures],
                files=dict(p3_index="p3/index.md", p3_best_worst="p3/best_worst/attention.json"))


# ----------------------------------------------------------------------------------------------- report

def results_table(results: dict) -> str:
    lines = ["| measure | value |", "| --- | --- |"]
    for key in ("p1_accuracy", "p1_single_prompt_accuracy", "p1_heldout_accuracy", "p1_heldout_accuracy_all_classes"):
        if results.get(key) is not None:
            lines.append("| %s | %.4f |" % (key, results[key]))
    for p in results.get("p1_prompts", []):
        lines.append("| P1 prompt: %s | %.4f |" % (p["templates"].replace("|", "\\|"), p["accuracy"]))
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
    for e in results.get("p3_best_worst", []):
        lines += ["", "P3 %s: CLIPScore %.4f, \"%s\"" % (e["image"], e["clipscore"], e["caption"])]
    if "pointing_game" in results:
        lines += ["", "attention pointing game: %s over %s shape words" % (
            "n/a" if results["pointing_game"] is None else "%.4f" % results["pointing_game"],
            results.get("pointing_trials"))]
    return "\n".join(lines) + "\n"


def stage_report(ctx: Context) -> dict:
    results = dict(ctx.results, command=command(ctx))
    results["seconds"] = round(sum(((results.get("timings") or {}).get("stages") or {}).values()), 1)
    with steps(1, "report") as bar:
        write_json(ctx.path("results.json"), results)
        table = results_table(results)
        with atomic_write(ctx.path("results.md")) as f:
            f.write(table)
        make_report.build(ctx.out, ctx.path("report.pdf"))
        bar.update(1)
    print(table)
    return {}


def command(ctx: Context) -> str:
    return "python3 run_all.py " + shlex.join(ctx.argv)


# ----------------------------------------------------------------------------------------------- stages

def extra_stage(spec: str) -> Callable[[Context], dict]:
    """--extra-stage module:function -> the function (called with the Context; returns results to merge)."""
    module, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError("--extra-stage %s: no function %r in module %r (%s)" % (spec, name, module, err)) from None
    return function


def stage_settings(ctx: Context, stage: str) -> dict:
    """What a stage's results depend on: a finished stage whose settings are unchanged is skipped."""
    a = ctx.args
    if stage == "p1":
        return dict(data=[ctx.data(k) for k in STAGE_DATA["p1"]], flags=ctx.p1_flags())
    if stage == "p2":
        return dict(train=[train_argv(ctx, m, "") for m in a.methods], train_max_images=a.train_max_images,
                    score_checkpoints=a.score_checkpoints, grid=DECODING_GRID)
    if stage == "p3":
        return dict(data=[ctx.data(k) for k in STAGE_DATA["p3"]], shipped=ctx.results.get("p2_shipping"),
                    inference=ctx.results.get("p2_inference"))
    upstream = {k: v for k, v in ctx.results.items() if k not in ("timings",)}  # the report and extra stages
    return dict(upstream=digest(upstream), stage=stage)


def stage_list(ctx: Context) -> List[tuple]:
    """(name, function, description) in running order; the extra stages before the report."""
    stages = [("p1", stage_p1, ABOUT["p1"]), ("p2", stage_p2, ABOUT["p2"] % ", ".join(ctx.args.methods)),
              ("p3", stage_p3, ABOUT["p3"])]
    for spec in ctx.args.extra_stage:
        function = extra_stage(spec)
        stages.append((spec, function, (function.__doc__ or "").strip().split("\n")[0]))
    return stages + [("report", stage_report, ABOUT["report"])]


def marker_path(ctx: Context, stage: str) -> str:
    return ctx.path(STAGE_DIR, stage.replace(":", "-").replace("/", "-") + ".json")


def run_stage(ctx: Context, name: str, function, selected: bool) -> None:
    marker = marker_path(ctx, name)
    done = read_json(marker, "stage marker") if os.path.isfile(marker) else None
    if not selected:
        if done:
            merge(ctx.results, done["results"])
        return
    settings = json.loads(json.dumps(stage_settings(ctx, name)))
    if done and done.get("settings") == settings and name not in ctx.args.force:
        ctx.say("%s: done earlier (%.0f s), skipping" % (name, done.get("seconds", 0)), stage=name, skipped=True)
        merge(ctx.results, done["results"])
        return
    if done:
        ctx.say("%s: %s, running it again" % (name, "forced" if name in ctx.args.force else "settings changed"))
        os.remove(marker)
    ctx.say("%s: %s" % (name, "starting"), stage=name)
    started = time.time()
    fragment = function(ctx) or {}
    seconds = round(time.time() - started, 1)
    merge(fragment, dict(timings=dict(stages={name: seconds})))
    merge(ctx.results, fragment)
    write_json(marker, dict(stage=name, settings=settings, seconds=seconds, results=fragment))
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
        marker = marker_path(ctx, name)
        state = "not selected" if name not in selected else (
            "finished earlier: skipped if its settings are unchanged" if os.path.isfile(marker) else "to run")
        lines.append("  %-8s %s [%s]" % (name, about, state))
    lines.append("  %s; log: %s" % (gpu_line(), ctx.log_path))
    lines.append("  time: each stage's is measured and printed; P2's remaining training is estimated after the "
                 "first attempt (README 'Your GPU day' has the RTX 2080 Ti estimate)")
    print("\n".join(lines), file=sys.stderr, flush=True)
    ctx.log(event="plan", command=command(ctx), stages=[s[0] for s in stages], selected=selected)


def install(ctx: Context) -> None:
    shipping = ctx.results.get("p2_shipping")
    if not shipping:
        raise UserError("--install needs P2's results in %s: run the p2 stage first" % ctx.out)
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
    g.add_argument("--data", required=True, help="the course's hw3_data folder (p1_data, p2_data, p3_data)")
    g.add_argument("--out", required=True, help="output folder (results, figures, checkpoints, stage markers)")
    g.add_argument("--only", help="comma list of stages to run (%s, or an --extra-stage); the others' earlier "
                   "results are kept" % ", ".join(STAGES))
    g.add_argument("--force", action="append", default=[], help="rerun this stage even if finished (repeatable)")
    g.add_argument("--install", action="store_true", help="copy the best captioner to checkpoints/p2_best.{pt,json}")
    g.add_argument("--extra-stage", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a stage of your own, run before the report: FUNCTION(context) returns results to merge")
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
    g = p.add_argument_group("models (defaults: the scripts' own)")
    g.add_argument("--p1-model", help="P1's CLIP (p1_clip_zeroshot.py --model)")
    g.add_argument("--p1-pretrained", help="P1's CLIP weights (p1_clip_zeroshot.py --pretrained)")
    g.add_argument("--clip-model", help="CLIP for CLIPScore (default %s)" % clip_utils.CLIPSCORE_CLIP[0])
    g.add_argument("--clip-pretrained", help="its weights (default %s)" % clip_utils.CLIPSCORE_CLIP[1])
    g.add_argument("--encoder", help="P2's frozen ViT (p2_train.py --encoder)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in p2_train.PEFT_METHODS]
    if bad or not args.methods:
        raise UserError("--methods: %s is not a PEFT method (%s)" % (",".join(bad) or "(none)",
                                                                    ", ".join(p2_train.PEFT_METHODS)))
    if bool(args.clip_model) != bool(args.clip_pretrained):
        raise UserError("--clip-model and --clip-pretrained go together")
    if not os.path.isdir(args.data):
        raise UserError("--data %s is not a folder (the course's hw3_data)" % args.data)
    if args.workers < 0 or args.train_max_images < 0:
        raise UserError("--workers and --train-max-images must be 0 or more")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # missing weights fail at once (hw3_download.sh fetches them)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    ctx = Context(args, argv)
    names = [s[0] for s in stage_list(ctx)]
    args.force = [s for f in args.force for s in f.split(",") if s]
    selected = [s.strip() for s in args.only.split(",")] if args.only else names
    for name in selected + args.force:
        if name not in names:
            raise UserError("no stage %r (the stages: %s)" % (name, ", ".join(names)))
    if ctx.rank != 0:  # under torchrun: the other ranks join each training and leave the rest to rank 0
        if "p2" in selected:
            train_json = train_split(ctx)
            for method in args.methods:
                train_method(ctx, method, train_json)
        return 0
    stages = stage_list(ctx)
    check_data(ctx, selected)
    print_plan(ctx, stages, selected)
    started = time.time()
    for name, function, _ in stages:
        if name == "p3" and "p3" in selected and "p2_shipping" not in ctx.results:
            raise UserError("p3 draws P2's best captioner, but %s has no finished p2 stage: add p2 to --only" % ctx.out)
        run_stage(ctx, name, function, name in selected)
    if ctx.results.get("p2_shipping"):
        print(shipping_note(ctx.results["p2_shipping"]))
    if args.install:
        install(ctx)
    print("run_all: %s in %.0f s (results in %s)" % (", ".join(selected), time.time() - started, ctx.out))
    return 0


if __name__ == "__main__":
    run_main(main)
