"""Scores world captioners on the validation split as docs/results.md's tables do: p2_inference.py (hw3_2.sh's code)
with explicit decoding settings, then CIDEr, CLIPScore (the tiny CLIP) and BLEU-4 (metrics.evaluate, p2_evaluate.py's
scoring) and the world's object F1 and exact object set, one line per checkpoint.

    python3 -m miniworld.score miniworld/models/p2_lora.pt miniworld/models/p2_lora_scst.pt --beam-size 3
    python3 -m miniworld.score miniworld/models/p2_lora_scst.pt --beam-size 5    # the demo's shipped decoding

The world is the demo's (outputs/demo/data, made by `bash demo.sh`; --data for another course-layout world).
"""
from __future__ import annotations

import argparse
import os

from hw3.models import clip_backend
from hw3.evaluation import metrics
from hw3.inference import predict
from hw3.pipeline import context
from hw3.models.decoding import DEFAULT_DECODING, DecodingSettings
from hw3.util.errors import UserError, run_main
from hw3.util.files import read_json
from miniworld import generate
from miniworld import world as world_lib

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")


def scenes_of(p2: str) -> dict:
    """{image key: [(colour, shape), ...]} of the validation split."""
    return world_lib.scenes_of(read_json(os.path.join(p2, "val_objects.json"), "world objects"))


def score(checkpoint: str, p2: str, settings: DecodingSettings, out: str, clip) -> dict:
    predict.main([os.path.join(p2, "images", "val"), out, os.path.join(p2, generate.COURSE_DECODER),
                       "--checkpoint", checkpoint, "--device", "cpu", "--num-workers", "0"]
                      + context.decoding_flags(settings))
    scores = metrics.evaluate(out, os.path.join(p2, "val.json"), os.path.join(p2, "images", "val"),
                              metrics.Scoring(clip=clip, metrics=("bleu", "cider", "clipscore")))
    objects = world_lib.object_scores(read_json(out), scenes_of(p2))
    return dict(CIDEr=scores["CIDEr"], CLIPScore=scores["CLIPScore"], object_f1=objects["object_f1"],
                exact_object_set=objects["exact_object_set"], BLEU4=scores["BLEU-4"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="captioner checkpoints (.pt with their .json)")
    parser.add_argument("--data", default=os.path.join("outputs", "demo", "data"), help="a course-layout world")
    parser.add_argument("--beam-size", type=int, default=DEFAULT_DECODING.beam_size,
                        help="beam size, the other settings hw3_2.sh's defaults (default %(default)s; 1 = greedy)")
    parser.add_argument("--out", default=os.path.join("outputs", "score"), help="folder for the captions")
    args = parser.parse_args(argv)
    p2 = os.path.join(args.data, generate.LAYOUTS["course"]["p2"])
    if not os.path.isfile(os.path.join(p2, "val_objects.json")):
        raise UserError("--data %s is not a course-layout world (run `bash demo.sh` first)" % args.data)
    if args.beam_size < 1:
        raise UserError("--beam-size must be at least 1, got %d" % args.beam_size)
    settings = DEFAULT_DECODING.replace(beam_size=args.beam_size, method="beam" if args.beam_size > 1 else "greedy")
    clip = clip_backend.load_clip(os.path.join(MODELS, "tiny_clip.json"), os.path.join(MODELS, "tiny_clip.pt"), "cpu")
    for checkpoint in args.checkpoints:
        name = os.path.splitext(os.path.basename(checkpoint))[0]
        row = score(checkpoint, p2, settings, os.path.join(args.out, "%s_beam%d.json" % (name, args.beam_size)), clip)
        print("%s (beam %d): %s" % (checkpoint, args.beam_size, ", ".join("%s %.4f" % kv for kv in row.items())),
              flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
