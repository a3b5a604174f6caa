"""Trains the miniature world's converged distill students with run_all.py's own distill stage (the demo's profile on
every training image of the full world, the committed LoRA captioner as the teacher) and installs them as
miniworld/models/distill_<set>.pt + .json, which the demo scores (run_all --score-students).

    python3 -m miniworld.train_students [--work outputs/students]
"""
from __future__ import annotations

import argparse
import os
import shutil

import run_all
from common import read_json, run_main, write_json
from miniworld import demo

STUDENT = dict(embed_dim=128, hidden_dim=256, dropout=0.3, epochs=10, batch_size=32, lr=3e-3, warmup_steps=50,
               label_smoothing=0.0, val_max_images=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(demo.ROOT, "outputs", "students"), help="run_all's OUT")
    args = parser.parse_args(argv)
    os.chdir(demo.ROOT)  # the checkpoints name the tiny encoder relative to the repository
    data = demo.make_world(os.path.join(args.work, "data"), 0, False)
    run_argv = demo.profile(data, args.work, demo.parse_args([]))
    for option in ("--score-students", "--train-max-images", "--train-config"):  # dropped with their values
        at = run_argv.index(option)
        del run_argv[at:at + 2]
    run_argv.remove("--no-feature-cache")
    config = os.path.join(args.work, "student_training.json")
    write_json(config, dict({m: demo.SHORT_RUN for m in demo.METHODS}, distill=STUDENT))
    run_argv += ["--train-config", os.path.relpath(config), "--only", "p2,distill"]
    run_all.main(run_argv)
    command = "python3 -m miniworld.train_students  # run_all.py %s" % " ".join(run_argv)
    for name in run_all.CAPTION_SETS:
        folder = os.path.join(args.work, "distill", name, "train")
        meta = dict(read_json(os.path.join(folder, "best.json")), trained_with=command)
        shutil.copyfile(os.path.join(folder, "best.pt"), os.path.join(demo.MODELS, "distill_%s.pt" % name))
        write_json(os.path.join(demo.MODELS, "distill_%s.json" % name), meta)
        print("%s: %s" % (name, meta.get("metrics")))
    return 0


if __name__ == "__main__":
    run_main(main)
