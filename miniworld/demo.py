"""The offline demo: the student's one command (run_all.py) on the miniature world, with the tiny models.

1. the world, laid out as the course's hw3_data (miniworld/generate.py --course-layout), 2. run_all.py with the demo's
profile: the tiny CLIP for P1 and CLIPScore, the tiny ViT, short p2_train.py runs (loss curves; the same settings as
before run_all existed), and the converged captioners in miniworld/models scored in their place
(--score-checkpoints), the compare stage (the classic architectures: short runs, and the converged
miniworld/models/p2_{gru,attention-gru,transformer,attention-gru_reg0}.pt scored), the distill stage likewise (its
short student runs trained and the converged students, distill_<set>.pt of train_captioners --distill, scored:
--score-students), the scst stage likewise (a one-epoch self-critical run from the converged p2_lora.pt, and the committed
p2_lora_scst.pt scored), 3. the world-only measures as an extra stage (world_stage: held-out classes, object F1, the
pointing game), which only the demo adds.

    python3 -m miniworld.demo --out outputs/demo [--small]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from typing import Dict, List

from hw3.pipeline.stages import compare as compare_stage
from hw3.pipeline.stages import p2 as p2_stage
from hw3.zeroshot import classify
from hw3.pipeline import run_all
from hw3.models.captioner import no_attention_reason
from hw3.util.errors import UserError, run_main
from hw3.util.files import read_json, write_json
from miniworld import generate, pointing, train_captioners
from miniworld import world as world_lib
from miniworld.train_vit import spec as encoder_spec

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = os.path.join(HERE, "models")
METHODS = p2_stage.METHODS
SHORT_RUN_IMAGES = 48
SHORT_RUN = dict(epochs=1, batch_size=16, lr=1e-3, warmup_steps=2, log_every=1, val_max_images=16)
SHORT_STUDENT = dict(SHORT_RUN, lr=3e-3)  # the distill students' short runs (--arch gru)
SCST_METHOD = "lora"  # the committed self-critical checkpoint's (p2_lora_scst.pt); the small world's best may differ
SHORT_SCST = dict(scst_epochs=1, scst_lr=train_captioners.SCST_LR)  # with the best method's SHORT_RUN (batch 16)
SOURCE = "miniature world, seed %d%s (tiny models trained from scratch here; not the homework's data)"


def rel(path: str) -> str:
    return os.path.relpath(path)


def say(text: str) -> None:
    print("== " + text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- steps

def make_world(folder: str, seed: int, small: bool) -> str:
    marker = os.path.join(folder, generate.MARKER)
    if os.path.isfile(marker):
        info = read_json(marker)
        if info.get("seed") == seed and bool(info.get("small")) == small and info.get("layout") == "course":
            say("world: reusing %s" % folder)
            return folder
    say("world: generating (seed %d%s, the course's layout)" % (seed, ", small" if small else ""))
    generate.generate(folder, seed, small, "course", os.path.join(MODELS, "decoder_model.bin"))
    return folder


def heldout_among_all(heldout_json: str, pred_csv: str) -> float:
    """Accuracy of the 50-way predictions on the images of the held-out classes only."""
    heldout = set(read_json(heldout_json)["labels"])
    with open(pred_csv, encoding="utf-8") as f:
        rows = [(int(r["filename"].split("_")[0]), int(r["label"])) for r in csv.DictReader(f)]
    rows = [(truth, guess) for truth, guess in rows if truth in heldout]
    return sum(truth == guess for truth, guess in rows) / max(1, len(rows))


def world_stage(ctx) -> Dict[str, object]:
    """world-only measures: P1 among the held-out classes, object F1 of each attempt (and of the distill stage's
    teacher and students, the compare stage's architectures), the pointing game"""
    data, folders = ctx.args.data, generate.LAYOUTS["course"]
    info = read_json(os.path.join(data, generate.MARKER), "world summary")
    heldout = os.path.join(data, folders["p1_heldout"])
    csv_path = ctx.path("p1", "heldout.csv")
    classify.main([os.path.join(heldout, "val"), os.path.join(heldout, "id2label.json"), csv_path,
                           "--evaluate"] + ctx.p1_flags())
    results = dict(source=SOURCE % (info["seed"], ", small" if info["small"] else ""),
                   p1_heldout_accuracy=read_json(ctx.path("p1", "heldout.eval.json"))["accuracy"],
                   p1_heldout_accuracy_all_classes=heldout_among_all(
                       os.path.join(data, folders["p1"], "heldout.json"), ctx.path("p1", "pred.csv")))
    scenes = world_lib.scenes_of(read_json(os.path.join(data, folders["p2"], "val_objects.json")))
    results["p2"] = {}
    for method in ctx.results["p2"]:
        f1 = world_lib.object_scores(read_json(ctx.path("p2", method, "pred.json")), scenes)
        results["p2"][method] = dict(object_f1=f1["object_f1"], exact_object_set=f1["exact_object_set"])
    if ctx.results.get("distill"):  # the distill stage's teacher and students (run_all --with distill)
        results["distill"] = {name: dict(object_f1=world_lib.object_scores(read_json(row["predictions"]), scenes)[
            "object_f1"]) for name, row in ctx.results["distill"].items()}
    say("world: pointing game over the validation split (%s, the README default decoding)" % ctx.results["p2_best"])
    pointing.main(["--images", ctx.data("val_images"), "--out", ctx.path("pointing.json"), "--objects",
                   os.path.join(data, folders["p2"], "val_objects.json"), "--checkpoint",
                   ctx.results["p2"][ctx.results["p2_best"]]["checkpoint"], "--decoder", ctx.data("decoder"),
                   "--device", ctx.args.device])
    summary = read_json(ctx.path("pointing.json"))
    results.update(pointing_game=summary.get("pointing_game"), pointing_trials=summary.get("pointing_trials"),
                   outputs=["p1/heldout.csv", "p1/heldout.eval.json", "pointing.json"])
    if ctx.results.get("compare"):
        compare_measures(ctx, scenes, os.path.join(data, folders["p2"], "val_objects.json"), results)
    if ctx.results.get("scst"):  # self-critical fine-tuning, before and after (run_all --with scst)
        results["scst"] = {side: {k: v for k, v in world_lib.object_scores(read_json(
            ctx.results["scst"][side]["predictions"]), scenes).items() if k in ("object_f1", "exact_object_set")}
            for side in ("before", "after")}

        def right(caption: str, image: str) -> bool:  # the caption names exactly the scene's objects
            return world_lib.object_scores({image: caption}, {image: scenes[image]})["exact_object_set"] == 1.0
        results["scst"]["changed"] = [dict(c, objects_right_before=right(c["before"], c["image"]),
                                           objects_right_after=right(c["after"], c["image"]))
                                      for c in ctx.results["scst"]["changed"]]
    return results


def compare_measures(ctx, scenes: dict, objects: str, results: dict) -> None:
    """Object F1 and the pointing game of each compare run (gru: none, it has no attention map), into results'
    "compare" rows and "ablation"; gpt2's are P2's best attempt's, measured above."""
    rows = results["compare"] = {}
    ablation = results["ablation"] = {}
    for name in compare_stage.COMPARE_RUNS:
        f1 = world_lib.object_scores(read_json(ctx.path("compare", name, "pred.json")), scenes)
        row = dict(object_f1=f1["object_f1"], exact_object_set=f1["exact_object_set"], pointing_game=None)
        scored = ctx.results["compare"].get(name) or ctx.results["ablation"][name]
        if scored["arch"] == "gru":
            say("world: no pointing game for %s (%s)" % (name, no_attention_reason("gru")))
        else:
            say("world: pointing game of %s" % name)
            out = ctx.path("compare", name, "pointing.json")
            pointing.main(["--images", ctx.data("val_images"), "--out", out, "--objects", objects, "--checkpoint",
                           scored["checkpoint"], "--decoder", ctx.data("decoder"), "--device", ctx.args.device])
            row["pointing_game"] = read_json(out).get("pointing_game")
            results["outputs"].append(os.path.relpath(out, ctx.out))
        if name in compare_stage.COMPARE_ARCHS:
            rows[name] = row
        if name in compare_stage.ABLATION:
            ablation[name] = dict(pointing_game=row["pointing_game"])
    rows["gpt2"] = dict(results["p2"][ctx.results["p2_best"]], pointing_game=results["pointing_game"])


def profile(data: str, out: str, args) -> List[str]:
    """run_all.py's arguments for the miniature world: the tiny models, short trainings, the converged captioners."""
    config = os.path.join(out, "short_training.json")
    write_json(config, dict({m: SHORT_RUN for m in METHODS + tuple(compare_stage.COMPARE_RUNS)},
                            distill=SHORT_STUDENT, scst=SHORT_SCST))
    return ["--data", rel(data), "--out", rel(out), "--methods", ",".join(METHODS), "--train-config", rel(config),
            "--train-max-images", str(SHORT_RUN_IMAGES), "--no-feature-cache",
            "--p1-model", rel(args.clip_config), "--p1-pretrained", rel(args.clip_weights),
            "--clip-model", rel(args.clip_config), "--clip-pretrained", rel(args.clip_weights),
            "--encoder", encoder_spec(), "--score-checkpoints", rel(args.captioners),
            "--device", "cpu", "--workers", "0", "--extra-stage", "miniworld.demo:world_stage",
            "--with", "distill,compare,scst", "--score-students", rel(args.captioners),
            "--teacher-captions", str(train_captioners.TEACHER_CAPTIONS),  # as the committed students saw
            "--scst-method", SCST_METHOD]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("outputs", "demo"), help="the one output folder")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--small", action="store_true", help="a reduced world (CI): seconds instead of minutes")
    parser.add_argument("--clip-config", default=os.path.join(MODELS, "tiny_clip.json"), help="tiny CLIP config")
    parser.add_argument("--clip-weights", default=os.path.join(MODELS, "tiny_clip.pt"), help="tiny CLIP weights")
    parser.add_argument("--captioners", default=MODELS, help="folder of the converged checkpoints: p2_<method>.pt "
                        "(the PEFT methods and the compare runs), p2_<method>_scst.pt and distill_<set>.pt")
    parser.add_argument("run_all_args", nargs="*", help="more run_all.py arguments after --, e.g. -- --force p2")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    for path in (args.clip_config, args.clip_weights, os.path.join(MODELS, "decoder_model.bin")):
        if not os.path.isfile(path):
            raise UserError("%s is missing: run `bash miniworld/build_models.sh`" % rel(path))
    started = time.time()
    data = make_world(os.path.join(args.out, "data"), args.seed, args.small)
    say("world: %.1f s" % (time.time() - started))
    return run_all.main(profile(data, args.out, args) + args.run_all_args)


if __name__ == "__main__":
    run_main(main)
