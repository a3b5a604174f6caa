"""P2 evaluation with the course's command line: CIDEr-D and CLIPScore of a {file name: caption} prediction file.

    python3 p2_evaluate.py --pred_file pred.json --images_root hw3_data/p2_data/images/val \
        --annotation_file hw3_data/p2_data/val.json

Scores as the course's p2_evaluate.py does (PTBTokenizer + pycocoevalcap Cider; CLIP ViT-B/32 openai weights),
without Java and batched; the scoring itself is metrics.evaluate, which training calls too.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import clip_utils
import metrics
from common import check_output_file, resolve_device, run_main, write_json


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    course = parser.add_argument_group("the course's arguments")
    course.add_argument("--pred_file", required=True, help="prediction JSON {file name without extension: caption}")
    course.add_argument("--images_root", default="hw3_data/p2_data/images/val", help="folder of the images")
    course.add_argument("--annotation_file", default="hw3_data/p2_data/val.json",
                        help="COCO-style ground truth (images: file_name, id; annotations: image_id, caption)")
    clip = parser.add_argument_group("CLIPScore")
    clip.add_argument("--clip-model", default=clip_utils.CLIPSCORE_CLIP[0],
                      help="open_clip model name or model-config JSON path (the course uses ViT-B/32)")
    clip.add_argument("--clip-pretrained", default=clip_utils.CLIPSCORE_CLIP[1],
                      help="open_clip pretrained tag (from the local cache) or a local checkpoint file; 'none' = random")
    clip.add_argument("--batch-size", type=int, default=64, help="images per CLIP batch")
    clip.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="image-loading worker processes")
    clip.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    other = parser.add_argument_group("other")
    other.add_argument("--java-tokenizer", action="store_true",
                       help="tokenise with pycocoevalcap's Java PTBTokenizer (needs java) instead of the equal Python one")
    other.add_argument("--per-image", metavar="OUT.json",
                       help="also write {image: {caption, cider, clipscore}} (p3_visualize.py --from-scores picks "
                            "the best and worst)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.per_image:
        check_output_file(args.per_image, "--per-image file")
    device = str(resolve_device(args.device))
    result = metrics.evaluate(args.pred_file, args.annotation_file, args.images_root, clip_model=args.clip_model,
                      clip_pretrained=args.clip_pretrained or None, batch_size=args.batch_size, device=device,
                      java_tokenizer=args.java_tokenizer, num_workers=args.num_workers)
    if args.per_image:  # {key: {"caption", "cider", "clipscore"}}: what p3_visualize.py --from-scores reads
        write_json(args.per_image, result["per_image"])
    print("CIDEr: %s | CLIPScore: %s" % (result["CIDEr"], result["CLIPScore"]))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main)
