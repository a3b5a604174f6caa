"""P2 evaluation with the course's command line: CIDEr-D and CLIPScore of a {file name: caption} prediction file,
and on request the field's other metrics (BLEU-1..4, METEOR, ROUGE-L, RefCLIPScore).

    python3 p2_evaluate.py --pred_file pred.json --images_root hw3_data/p2_data/images/val \
        --annotation_file hw3_data/p2_data/val.json
    python3 p2_evaluate.py --pred_file pred.json --images_root Flicker8k_Dataset \
        --annotation_file dataset_flickr8k.json --split test --metrics all --json scores.json

Scores as the course's p2_evaluate.py does (PTBTokenizer + pycocoevalcap's scorers; CLIP ViT-B/32 openai weights),
without Java except for METEOR, and batched; the scoring itself is metrics.evaluate, which training calls too. The
references may be any caption format hw3.data.caption_files reads (COCO, Karpathy, DeepFashion-MultiModal, plain JSON).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from hw3.models import clip_backend
from hw3.evaluation import metrics
from hw3.data import caption_files
from hw3.util.device import resolve_device
from hw3.util.errors import run_main
from hw3.util.files import check_output_file, write_json


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    course = parser.add_argument_group("the course's arguments")
    course.add_argument("--pred_file", required=True, help="prediction JSON {file name without extension: caption}")
    course.add_argument("--images_root", default="hw3_data/p2_data/images/val", help="folder of the images")
    course.add_argument("--annotation_file", default="hw3_data/p2_data/val.json",
                        help="ground-truth captions: COCO-style (the course's), Karpathy split JSON, DeepFashion-"
                             "MultiModal captions.json or {file name: caption or [captions]}")
    scores = parser.add_argument_group("metrics and splits")
    scores.add_argument("--metrics", default=",".join(metrics.DEFAULT_METRICS),
                        help="comma list of %s, or all; BLEU gives BLEU-1..4, METEOR needs Java"
                             % ", ".join(metrics.METRIC_KEYS))
    scores.add_argument("--json", metavar="OUT.json", help="also write {metric: score} for the metrics asked "
                        "(keys BLEU-1..4, METEOR, ROUGE-L, CIDEr, CLIPScore, RefCLIPScore; null if skipped)")
    scores.add_argument("--split", choices=caption_files.SPLITS, default=None,
                        help="the images scored: val of a file with splits by default, the whole of a file without; "
                             "train/val of a file without splits divide it by file-name hash; all = every image")
    scores.add_argument("--val-fraction", type=float, default=caption_files.VAL_FRACTION,
                        help="share of a file without splits that --split val takes")
    clip = parser.add_argument_group("CLIPScore and RefCLIPScore")
    clip.add_argument("--clip-model", default=clip_backend.CLIPSCORE_CLIP[0],
                      help="open_clip model name or model-config JSON path (the course uses ViT-B/32)")
    clip.add_argument("--clip-pretrained", default=clip_backend.CLIPSCORE_CLIP[1],
                      help="open_clip pretrained tag (from the local cache) or a local checkpoint file; 'none' = random")
    clip.add_argument("--batch-size", type=int, default=64, help="images per CLIP batch")
    clip.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="image-loading worker processes")
    clip.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    other = parser.add_argument_group("other")
    other.add_argument("--java-tokenizer", action="store_true",
                       help="tokenise with pycocoevalcap's Java PTBTokenizer (needs java) instead of the equal Python one")
    other.add_argument("--per-image", metavar="OUT.json",
                       help="also write {image: {caption, cider, clipscore...}}, one score per metric asked "
                            "(p3_visualize.py --from-scores picks the best and worst by clipscore)")
    args = parser.parse_args(argv)
    args.metrics = metrics.parse_metrics(args.metrics)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for path, what in ((args.per_image, "--per-image file"), (args.json, "--json file")):
        if path:
            check_output_file(path, what)
    device = str(resolve_device(args.device))
    result = metrics.evaluate(args.pred_file, args.annotation_file, args.images_root,
                              metrics.Scoring(args.metrics, clip_model=args.clip_model,
                                              clip_pretrained=args.clip_pretrained or None, batch_size=args.batch_size,
                                              device=device, tokenizer="java" if args.java_tokenizer else "python",
                                              num_workers=args.num_workers),
                              split=args.split, val_fraction=args.val_fraction)
    keys = metrics.result_keys(args.metrics)
    if args.per_image:  # {key: {"caption", "cider", "clipscore"...}}: what p3_visualize.py --from-scores reads
        write_json(args.per_image, result["per_image"])
    if args.json:
        write_json(args.json, {k: result.get(k) for k in keys})
    print(" | ".join("%s: %s" % (k, result[k]) for k in keys if k in result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main)
