"""Trains the miniature world's converged captioners, one per PEFT method, with p2_train.py itself, and installs
them as miniworld/models/p2_<method>.pt + .json (what the demo scores through p2_inference.py); with --archs, also the
classic decoders trained from scratch over the same encoder (p2_train.py --arch), as p2_<arch run>.pt + .json; with
--distill, the students of section 4 of the course project report (Zhao, Wang and Zhang): the teacher (p2_lora.pt,
the demo's p2_best) captions the training images precisely (its shipped decoding) and creatively (sampled at 0.9), and
one gru student trains on each caption set and on the human captions, alike but for --train-json, as
distill_<set>.pt + .json (the demo scores them: --score-students).

The encoder is the tiny timm ViT of miniworld/train_vit.py (loaded the way a real timm tower is), the decoder the tiny
GPT-2 in the course's format; the methods train side by side, one thread each, with the same settings and epochs.
The from-scratch runs take their recipe from ARCH_TRAINING (batch, lr) and ARCH_SETTINGS (sizes, epochs).

    python3 -m miniworld.train_captioners [--epochs 5] [--methods adapter,prefix,lora]
    python3 -m miniworld.train_captioners --archs gru,attention-gru,transformer,attention-gru_reg0 --parallel 2
    python3 -m miniworld.train_captioners --distill --parallel 2

With --scst, each method's committed checkpoint is fine-tuned instead by self-critical training (p2_train.py
--init-from p2_<method>.pt --epochs 0 --scst-epochs N) and installed as miniworld/models/p2_<method>_scst.pt + .json:

    python3 -m miniworld.train_captioners --methods lora --scst
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from hw3.pipeline.stages import distill as distill_stage
from hw3.pipeline import trainings
from hw3.pipeline import context
from hw3.models.decoding import DecodingSettings
from hw3.util.errors import UserError, run_main
from hw3.util.files import read_json, write_json
from miniworld import generate
from miniworld.train_vit import spec as encoder_spec

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ENCODER = encoder_spec()  # the captioners' frozen encoder, relative to the repository

MODELS = os.path.join("miniworld", "models")
METHOD_SETTINGS = {  # on top of p2_train.py's defaults and decoder.peft_config's presets
    "adapter": ["--adapter-dim", "32"],
    "prefix": ["--prefix-len", "10", "--prefix-hidden", "128"],
    "lora": ["--lora-rank", "8", "--lora-alpha", "16"],
}
# from-scratch runs (no GPT-2 weights, every parameter trained): run name -> p2_train.py --arch and its own recipe
ARCH_SETTINGS = {
    # gru's global vector is the ViT's class token: the mean of the tokens loses which colour goes with which shape
    "gru": ["--arch", "gru", "--embed-dim", "256", "--hidden-dim", "512", "--dropout", "0.3", "--epochs", "8",
            "--global-pool", "cls"],
    "gru_mean": ["--arch", "gru", "--embed-dim", "256", "--hidden-dim", "512", "--dropout", "0.3", "--epochs", "8",
                 "--global-pool", "mean"],
    "attention-gru": ["--arch", "attention-gru", "--embed-dim", "256", "--hidden-dim", "256", "--attention-dim", "256",
                      "--dropout", "0.3", "--attention-reg", "1", "--epochs", "4"],
    "attention-gru_reg0": ["--arch", "attention-gru", "--embed-dim", "256", "--hidden-dim", "256",
                           "--attention-dim", "256", "--dropout", "0.3", "--attention-reg", "0", "--epochs", "4"],
    "transformer": ["--arch", "transformer", "--n-layer", "3", "--n-head", "4", "--n-embd", "128", "--dropout", "0.1",
                    "--epochs", "4"],
}
ARCH_TRAINING = ["--batch-size", "64", "--lr", "4e-3"]  # every from-scratch run (a short CPU run)
# --distill: the teacher, its shipped decoding (the demo's p2_inference choice), the students' recipe, captions/image
TEACHER = os.path.join(MODELS, "p2_lora.pt")  # the demo's p2_best
SHIPPED = os.path.join("results", "miniworld", "results.json")  # the demo's results: "p2_inference" is the decoding
STUDENT = "gru_mean"  # the smallest classic captioner, with its ARCH_SETTINGS recipe (the committed students' pool)
TEACHER_CAPTIONS = 5  # per training image, as the human sets have: the 5 best beams (precise), 5 draws (creative)
SCST_EPOCHS, SCST_LR, SCST_SAMPLES = 4, 1e-4, 5  # the settings of the committed p2_lora_scst.pt


def installed(method: str, scst: bool) -> str:
    """The committed checkpoint of a run, or of its self-critical fine-tuning."""
    return os.path.join(MODELS, "p2_%s%s.pt" % (method, "_scst" if scst else ""))


def common_options(world: str, args, train_json: str = "") -> list:
    """p2_train.py's options shared by every run: the world (its human captions unless `train_json`), the encoder,
    validation on the human references, the seed."""
    p2 = os.path.join(world, "p2")
    return [sys.executable, os.path.join(ROOT, "p2_train.py"),
            "--train-json", train_json or os.path.join(p2, "train.json"),
            "--train-images", os.path.join(p2, "images", "train"),
            "--val-json", os.path.join(p2, "val.json"), "--val-images", os.path.join(p2, "images", "val"),
            "--val-max-images", str(args.val_images), "--encoder", ENCODER]


def command(method: str, world: str, out: str, cache: str, args, train_json: str = "") -> list:
    if method in ARCH_SETTINGS:
        return common_options(world, args, train_json) + [
            "--label-smoothing", "0", "--warmup-steps", "50",
            "--feature-cache", cache, "--workers", "0", "--device", "cpu",
            "--clip-model", os.path.join(MODELS, "tiny_clip.json"), "--clip-pretrained",
            os.path.join(MODELS, "tiny_clip.pt"), "--val-decode", "greedy", "--val-max-len", "24",
            "--seed", str(args.seed), "--out", out] + ARCH_TRAINING + ARCH_SETTINGS[method]
    scst = getattr(args, "scst", False)
    tuning = ["--init-from", installed(method, False), "--scst-epochs", str(args.scst_epochs), "--scst-lr",
              str(args.scst_lr), "--scst-samples", str(args.scst_samples)] if scst else []
    return common_options(world, args) + [
        "--decoder-weights", os.path.join(MODELS, "decoder_model.bin"), "--peft", method,
        "--epochs", str(0 if scst else args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--label-smoothing", str(args.label_smoothing),
        "--warmup-steps", "50", "--feature-cache", cache, "--workers", "0", "--device", "cpu",
        "--clip-model", os.path.join(MODELS, "tiny_clip.json"), "--clip-pretrained",
        os.path.join(MODELS, "tiny_clip.pt"), "--val-decode", "greedy", "--val-max-len", "24",
        "--seed", str(args.seed), "--out", out] + ([] if args.gate else ["--no-cross-attn-gate"]) \
        + METHOD_SETTINGS[method] + tuning


def trained_with(method: str, args) -> str:
    """The command that retrains this one run."""
    if method.startswith("distill_"):
        return "python3 -m miniworld.train_captioners --distill --seed %d" % args.seed
    if method in ARCH_SETTINGS:
        return "python3 -m miniworld.train_captioners --archs %s --seed %d" % (method, args.seed)
    scst = " --scst --scst-epochs %d --scst-lr %g --scst-samples %d" % (
        args.scst_epochs, args.scst_lr, args.scst_samples) if args.scst else ""
    return ("python3 -m miniworld.train_captioners --methods %s --epochs %d --batch-size %d --lr %g "
            "--label-smoothing %g --seed %d%s%s" % (method, args.epochs, args.batch_size, args.lr,
                                                    args.label_smoothing, args.seed, " --gate" if args.gate else "",
                                                    scst))


def start(name: str, world: str, cache: str, env: dict, args, train_sets: dict):
    """Starts one p2_train.py run in the background: (process, log file, out folder, start time). A run named
    distill_<set> is the student's recipe on train_sets[<set>]."""
    out = os.path.join(args.work, name + ("_scst" if args.scst else ""))
    if os.path.isdir(out):
        shutil.rmtree(out)
    log = open(os.path.join(args.work, name + ".log"), "w")
    caption_set = name[len("distill_"):] if name.startswith("distill_") else ""
    argv = command(STUDENT if caption_set else name, world, out, cache, args, train_sets.get(caption_set, ""))
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, log, out, time.time()


def train_runs(names: list, world: str, cache: str, env: dict, args, train_sets: dict) -> dict:
    """Runs every training, at most --parallel at once (0 = all); the first alone until it has filled the feature
    cache. Returns {name: (out folder, wall seconds of its run)}."""
    limit = args.parallel or len(names)
    waiting, running, done, failed = list(names), {}, {}, []
    while waiting or running:
        while waiting and len(running) < limit and (done or not running or cache_filled(running)):
            name = waiting.pop(0)
            running[name] = start(name, world, cache, env, args, train_sets)
        for name, (process, log, out, began) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[name]
                done[name] = (out, time.time() - began)
                if process.returncode != 0:
                    failed.append(name)
        time.sleep(2)
    if failed:
        raise UserError("training failed for %s: see %s" % (", ".join(failed), ", ".join(
            os.path.join(args.work, m + ".log") for m in failed)))
    return done


def cache_filled(running: dict) -> bool:
    """The feature cache is filled once, by the first run, before the others start: it is done when the run logs."""
    return all(process.poll() is not None or os.path.isfile(os.path.join(out, "log.jsonl"))
               for process, _, out, _ in running.values())


def teacher_flags(name: str) -> list:
    """precise: the teacher's shipped decoding; creative: run_all's sampling at 0.9 with the same lengths."""
    shipped = {k: v for k, v in read_json(SHIPPED, "the demo's results")["p2_inference"].items() if k != "chosen_on"}
    if name == "precise":
        return context.decoding_flags(DecodingSettings.from_record(shipped))
    lengths = {k: shipped[k] for k in ("max_len", "min_len", "no_repeat_ngram")}
    return context.decoding_flags(DecodingSettings(**lengths, **distill_stage.CREATIVE))


def teacher_captions(world: str, env: dict, args) -> dict:
    """The teacher's precise and creative captions of the training images, side by side (p2_inference.py --format
    coco, a file p2_train.py reads): {set: COCO file}, with "human" the world's own train.json."""
    p2, folder = os.path.join(world, "p2"), os.path.join(args.work, "distill")
    os.makedirs(folder, exist_ok=True)
    files, running = dict(human=os.path.join(p2, "train.json")), []
    for name in ("precise", "creative"):
        files[name] = os.path.join(folder, "teacher_%s.json" % name)
        argv = [sys.executable, os.path.join(ROOT, "p2_inference.py"), os.path.join(p2, "images", "train"), files[name],
                os.path.join(MODELS, "decoder_model.bin"), "--checkpoint", TEACHER, "--captions", files["human"],
                "--split", "all", "--format", "coco", "--captions-per-image", str(TEACHER_CAPTIONS), "--device", "cpu",
                "--num-workers", "0"] + teacher_flags(name)
        log = open(os.path.join(folder, "teacher_%s.log" % name), "w")
        running.append((subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log, name))
        if len(running) >= (args.parallel or 2):
            wait_teacher(running.pop(0), folder)
    for job in running:
        wait_teacher(job, folder)
    return files


def wait_teacher(job: tuple, folder: str) -> None:
    process, log, name = job
    process.wait()
    log.close()
    if process.returncode != 0:
        raise UserError("the teacher's %s captions failed: see %s" % (
            name, os.path.join(folder, "teacher_%s.log" % name)))


def train_captions(caption_set: str) -> dict:
    """What a distill student's JSON says it learnt from: the world's human captions or the teacher's decoding."""
    if caption_set == "human":
        return dict(caption_set="human", captions_per_image=TEACHER_CAPTIONS, file="the world's p2/train.json")
    return dict(caption_set=caption_set, captions_per_image=TEACHER_CAPTIONS, teacher=TEACHER,
                decoding=" ".join(teacher_flags(caption_set)))


def install(name: str, out: str, seconds: float, args, captions: dict = None) -> None:
    """best.pt and its config, with the command that retrains it and its wall time, as miniworld/models/<stem>; a
    distill student's also says which captions it learnt from."""
    stem = name if name.startswith("distill_") else os.path.splitext(os.path.basename(installed(name, args.scst)))[0]
    meta = read_json(os.path.join(out, "best.json"))
    meta["trained_with"] = trained_with(name, args)
    trained = read_json(os.path.join(out, "args.json"))  # p2_train.py's settings, for the report's best setting
    meta["training"] = {k: trained.get(k) for k in trainings.TRAINING_RECORD}
    meta["train_seconds"] = round(seconds)  # wall time of this run (the first one also fills the feature cache)
    if captions is not None:
        meta["train_captions"] = captions
    shutil.copyfile(os.path.join(out, "best.pt"), os.path.join(MODELS, stem + ".pt"))
    write_json(os.path.join(MODELS, stem + ".json"), meta)
    print("%s: %s in %.0f s -> %s" % (name, meta.get("metrics"), seconds, os.path.join(MODELS, stem + ".pt")))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None,
                        help="comma list of PEFT methods (default adapter,prefix,lora; none when --archs is given)")
    parser.add_argument("--archs", default="", help="comma list of from-scratch runs, named as in ARCH_SETTINGS: %s"
                        % ", ".join(ARCH_SETTINGS))
    parser.add_argument("--distill", action="store_true", help="the course project report's section 4: the "
                        "teacher's captions of the training images (precise, creative; %d per image) and a %s student "
                        "on each and on the human captions, installed as distill_<set>.pt"
                        % (TEACHER_CAPTIONS, STUDENT))
    parser.add_argument("--epochs", type=int, default=5, help="PEFT runs: epochs over every (image, caption) pair")
    parser.add_argument("--batch-size", type=int, default=32, help="PEFT runs: captions per step")
    parser.add_argument("--lr", type=float, default=5e-3, help="PEFT runs: peak learning rate")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="PEFT runs: p2_train.py's label smoothing (default 0, the setting the committed "
                             "captioners used)")
    parser.add_argument("--gate", action="store_true",
                        help="PEFT runs: keep the tanh gate on cross-attention (default off: in a short CPU run the "
                             "words are grounded in the image sooner when cross-attention contributes from the first "
                             "step)")
    parser.add_argument("--val-images", type=int, default=100, help="validation images scored after each epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run (default 1: the runs "
                        "share the cores)")
    parser.add_argument("--parallel", type=int, default=0, help="most runs at once (default 0: all side by side)")
    parser.add_argument("--seed", type=int, default=0, help="world and training seed")
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "captioners"), help="runs, world and cache")
    g = parser.add_argument_group("self-critical fine-tuning of the committed PEFT checkpoints")
    g.add_argument("--scst", action="store_true", help="fine-tune miniworld/models/p2_<method>.pt by self-critical "
                   "training into p2_<method>_scst.pt instead of training anew (--epochs is then not used)")
    g.add_argument("--scst-epochs", type=int, default=SCST_EPOCHS, help="self-critical epochs (p2_train.py's)")
    g.add_argument("--scst-lr", type=float, default=SCST_LR, help="their constant learning rate")
    g.add_argument("--scst-samples", type=int, default=SCST_SAMPLES, help="sampled captions per image")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in (args.methods if args.methods is not None else
                           "" if args.archs or args.distill else "adapter,prefix,lora").split(",") if m]
    archs = [a for a in args.archs.split(",") if a]
    unknown = [m for m in methods if m not in METHOD_SETTINGS]
    if unknown:
        raise UserError("--methods: unknown %s (choose from %s)" % (unknown, ", ".join(METHOD_SETTINGS)))
    unknown = [a for a in archs if a not in ARCH_SETTINGS]
    if unknown:
        raise UserError("--archs: unknown %s (choose from %s)" % (unknown, ", ".join(ARCH_SETTINGS)))
    if not methods + archs and not args.distill:
        raise UserError("nothing to train: give --methods, --archs or --distill")
    if args.scst and (archs or args.distill):
        raise UserError("--scst fine-tunes the committed PEFT checkpoints (--methods), not --archs or --distill")
    missing = [installed(m, False) for m in methods if args.scst and not os.path.isfile(os.path.join(ROOT,
                                                                                                     installed(m, False)))]
    if missing:
        raise UserError("--scst fine-tunes the committed checkpoints, missing: %s (train them first, without --scst)"
                        % ", ".join(missing))
    if args.parallel < 0:
        raise UserError("--parallel must be >= 0 (0 = every run at once), got %d" % args.parallel)
    os.chdir(ROOT)  # the encoder spec saved in each checkpoint names the tiny CLIP relative to the repository
    world = os.path.join(args.work, "world")
    if not os.path.isfile(os.path.join(world, generate.MARKER)):
        generate.generate(world, args.seed, False)
    cache = os.path.join(args.work, "cache")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    started = time.time()
    train_sets = teacher_captions(world, env, args) if args.distill else {}
    students = ["distill_" + name for name in train_sets]
    if args.distill:
        print("teacher captions in %.0f s" % (time.time() - started))
    done = train_runs(methods + archs + students, world, cache, env, args, train_sets)
    for name in methods + archs + students:
        install(name, *done[name], args, train_captions(name[len("distill_"):]) if name in students else None)
    print("trained %s in %.0f s" % (", ".join(methods + archs + students), time.time() - started))
    return 0


if __name__ == "__main__":
    run_main(main)
