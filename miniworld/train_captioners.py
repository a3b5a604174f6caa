"""Trains the miniature world's converged captioners, one per PEFT method, with p2_train.py itself, and installs
them as miniworld/models/p2_<method>.pt + .json (what the demo scores through p2_inference.py).

The encoder is the tiny timm ViT of miniworld/train_vit.py (loaded the way a real timm tower is), the decoder the tiny
GPT-2 in the course's format; the methods train side by side, one thread each, with the same settings and epochs.

    python3 -m miniworld.train_captioners [--epochs 5] [--methods adapter,prefix,lora]

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

from common import UserError, read_json, run_main, write_json
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
SCST_EPOCHS, SCST_LR, SCST_SAMPLES = 1, 5e-4, 5  # the settings of the committed p2_lora_scst.pt


def installed(method: str, scst: bool) -> str:
    """The committed checkpoint of a method, or of its self-critical fine-tuning."""
    return os.path.join(MODELS, "p2_%s%s.pt" % (method, "_scst" if scst else ""))


def command(method: str, world: str, out: str, cache: str, args) -> list:
    p2 = os.path.join(world, "p2")
    scst = ["--init-from", installed(method, False), "--scst-epochs", str(args.scst_epochs), "--scst-lr",
            str(args.scst_lr), "--scst-samples", str(args.scst_samples)] if args.scst else []
    return [sys.executable, os.path.join(ROOT, "p2_train.py"),
            "--train-json", os.path.join(p2, "train.json"), "--train-images", os.path.join(p2, "images", "train"),
            "--val-json", os.path.join(p2, "val.json"), "--val-images", os.path.join(p2, "images", "val"),
            "--val-max-images", str(args.val_images), "--encoder", ENCODER,
            "--decoder-weights", os.path.join(MODELS, "decoder_model.bin"), "--peft", method,
            "--epochs", str(0 if args.scst else args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr),
            "--label-smoothing", str(args.label_smoothing),
            "--warmup-steps", "50", "--feature-cache", cache, "--workers", "0", "--device", "cpu",
            "--clip-model", os.path.join(MODELS, "tiny_clip.json"), "--clip-pretrained",
            os.path.join(MODELS, "tiny_clip.pt"), "--val-decode", "greedy", "--val-max-len", "24",
            "--seed", str(args.seed), "--out", out] + ([] if args.gate else ["--no-cross-attn-gate"]) \
        + METHOD_SETTINGS[method] + scst


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="adapter,prefix,lora", help="comma list of PEFT methods")
    parser.add_argument("--epochs", type=int, default=5, help="epochs over every (image, caption) pair")
    parser.add_argument("--batch-size", type=int, default=32, help="captions per step")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="p2_train.py's label smoothing (default 0, the setting the committed captioners used)")
    parser.add_argument("--gate", action="store_true",
                        help="keep the tanh gate on cross-attention (default off: in a short CPU run the words are "
                             "grounded in the image sooner when cross-attention contributes from the first step)")
    parser.add_argument("--val-images", type=int, default=100, help="validation images scored after each epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run (default 1: the runs "
                        "share the cores)")
    parser.add_argument("--seed", type=int, default=0, help="world and training seed")
    g = parser.add_argument_group("self-critical fine-tuning of the committed checkpoints")
    g.add_argument("--scst", action="store_true", help="fine-tune miniworld/models/p2_<method>.pt by self-critical "
                   "training into p2_<method>_scst.pt instead of training anew (--epochs is then not used)")
    g.add_argument("--scst-epochs", type=int, default=SCST_EPOCHS, help="self-critical epochs (p2_train.py's)")
    g.add_argument("--scst-lr", type=float, default=SCST_LR, help="their constant learning rate")
    g.add_argument("--scst-samples", type=int, default=SCST_SAMPLES, help="sampled captions per image")
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "captioners"), help="runs, world and cache")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHOD_SETTINGS]
    if unknown:
        raise UserError("--methods: unknown %s (choose from %s)" % (unknown, ", ".join(METHOD_SETTINGS)))
    if args.scst:
        missing = [installed(m, False) for m in methods
                   if not os.path.isfile(os.path.join(ROOT, installed(m, False)))]
        if missing:
            raise UserError("--scst fine-tunes the committed checkpoints, missing: %s (train them first, without "
                            "--scst)" % ", ".join(missing))
    os.chdir(ROOT)  # the encoder spec saved in each checkpoint names the tiny CLIP relative to the repository
    world = os.path.join(args.work, "world")
    if not os.path.isfile(os.path.join(world, generate.MARKER)):
        generate.generate(world, args.seed, False)
    cache = os.path.join(args.work, "cache")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    # the feature cache is filled once, by the first run, before the others start
    runs, started = {}, time.time()
    for i, method in enumerate(methods):
        out = os.path.join(args.work, method + ("_scst" if args.scst else ""))
        if os.path.isdir(out):
            shutil.rmtree(out)
        log = open(out + ".log", "w")
        runs[method] = (subprocess.Popen(command(method, world, out, cache, args), env=env, stdout=log,
                                         stderr=subprocess.STDOUT), log, out)
        if i == 0:
            while runs[method][0].poll() is None and not os.path.isfile(os.path.join(out, "log.jsonl")):
                time.sleep(2)
    failed = []
    for method, (process, log, out) in runs.items():
        if process.wait() != 0:
            failed.append(method)
        log.close()
    if failed:
        raise UserError("training failed for %s: see %s" % (", ".join(failed), ", ".join(
            runs[m][2] + ".log" for m in failed)))
    seconds = time.time() - started
    for method, (_, _, out) in runs.items():
        meta = read_json(os.path.join(out, "best.json"))
        meta["trained_with"] = ("python3 -m miniworld.train_captioners --methods %s --epochs %d --batch-size %d --lr %g "
                                "--label-smoothing %g --seed %d%s" % (method, args.epochs, args.batch_size, args.lr,
                                                                      args.label_smoothing, args.seed,
                                                                      " --gate" if args.gate else ""))
        if args.scst:
            meta["trained_with"] += " --scst --scst-epochs %d --scst-lr %g --scst-samples %d" % (
                args.scst_epochs, args.scst_lr, args.scst_samples)
        meta["train_seconds"] = round(seconds)
        target = installed(method, args.scst)
        shutil.copyfile(os.path.join(out, "best.pt"), target)
        write_json(os.path.splitext(target)[0] + ".json", meta)
        print("%s: %s -> %s" % (method, meta.get("metrics"), target))
    print("trained %s in %.0f s" % (", ".join(methods), seconds))
    return 0


if __name__ == "__main__":
    run_main(main)
