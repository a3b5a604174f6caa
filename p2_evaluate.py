"""P2 evaluation with the course's command line: CIDEr-D and CLIPScore of a {file name: caption} prediction file.

    python3 p2_evaluate.py --pred_file pred.json --images_root hw3_data/p2_data/images/val \
        --annotation_file hw3_data/p2_data/val.json

Scores as the course's p2_evaluate.py does (PTBTokenizer + pycocoevalcap Cider; CLIP ViT-B/32 openai weights),
without Java and batched. Training imports `evaluate` and passes its already loaded CLIP.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

from common import UserError, read_json, run_main, write_json

SHOWN_KEYS = 5


def load_references(annotation_file: Union[str, dict]) -> Tuple["OrderedDict[str, List[str]]", Dict[str, str]]:
    """({key: captions in annotation order}, {key: image file name}) from a COCO-style caption file; the key is the
    file name without extension, as the course's prediction files use."""
    what = "annotation file"
    data = read_json(annotation_file, what) if isinstance(annotation_file, str) else annotation_file
    where = annotation_file if isinstance(annotation_file, str) else "annotations"
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise UserError("%s %s must be COCO-style: {\"images\": [{\"file_name\", \"id\"}...], "
                        "\"annotations\": [{\"image_id\", \"caption\"}...]}" % (what, where))
    key_of_id, file_of_key = {}, OrderedDict()
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise UserError("%s %s: images[%d] lacks \"file_name\" or \"id\"" % (what, where, i))
        key = os.path.splitext(os.path.basename(str(image["file_name"])))[0]
        if key in file_of_key:
            raise UserError("%s %s: two images share the key %r (file names without extension must be unique)"
                            % (what, where, key))
        key_of_id[image["id"]] = key
        file_of_key[key] = str(image["file_name"])
    references = OrderedDict((key, []) for key in file_of_key)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise UserError("%s %s: annotations[%d] lacks \"image_id\" or a string \"caption\"" % (what, where, i))
        if ann["image_id"] not in key_of_id:
            raise UserError("%s %s: annotations[%d] refers to image_id %r, which is not in \"images\""
                            % (what, where, i, ann["image_id"]))
        references[key_of_id[ann["image_id"]]].append(ann["caption"])
    empty = [k for k, caps in references.items() if not caps]
    if empty:
        raise UserError("%s %s: %d image(s) have no caption: %s" % (what, where, len(empty), _show(empty)))
    return references, dict(file_of_key)


def _show(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:SHOWN_KEYS]) + (" ..." if len(keys) > SHOWN_KEYS else "")


def check_predictions(predictions, references: Dict[str, List[str]], where: str = "predictions") -> None:
    """The course asserts that prediction keys equal the annotated images and values are strings; say what differs."""
    if not isinstance(predictions, dict):
        raise UserError("%s must be a JSON object {file name without extension: caption}, not %s"
                        % (where, type(predictions).__name__))
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append("%d image(s) without a prediction: %s" % (len(missing), _show(missing)))
        if extra:
            parts.append("%d key(s) not in the annotations: %s" % (len(extra), _show(extra)))
        raise UserError("%s keys do not match the annotations (%d predictions, %d annotated images): %s"
                        % (where, len(predictions), len(references), "; ".join(parts)))
    not_text = [k for k, v in predictions.items() if not isinstance(v, str)]
    if not_text:
        raise UserError("%s: %d caption(s) are not strings: %s" % (where, len(not_text), _show(not_text)))


def evaluate(pred: Union[str, Dict[str, str]], annotation_file: Union[str, dict], images_root: str,
             clip: Optional[tuple] = None, clip_model: str = "ViT-B-32", clip_pretrained: Optional[str] = "openai",
             batch_size: int = 64, device: str = "cpu", java_tokenizer: bool = False,
             num_workers: int = 0) -> dict:
    """{"CIDEr", "CLIPScore", "per_image": {key: {"caption", "cider", "clipscore"}}} for predictions (a dict or a
    JSON path). `clip` = (model, preprocess, tokenizer) reuses a loaded CLIP; otherwise clip_model/clip_pretrained
    are loaded through clip_utils. Everything is checked before any model runs."""
    import metrics

    where = pred if isinstance(pred, str) else "predictions"
    predictions = read_json(pred, "prediction file") if isinstance(pred, str) else pred
    references, files = load_references(annotation_file)
    check_predictions(predictions, references, where)
    if not os.path.isdir(images_root):
        raise UserError("images root not found or not a directory: %s" % images_root)
    keys = list(predictions)
    paths = [os.path.join(images_root, files[k]) for k in keys]
    absent = [files[k] for k, p in zip(keys, paths) if not os.path.isfile(p)]
    if absent:
        raise UserError("%d image(s) missing from %s: %s" % (len(absent), images_root, _show(absent)))

    if clip is None:  # before CIDEr: a missing CLIP download fails at once
        import clip_utils

        clip = clip_utils.load_clip(clip_model, clip_pretrained, device)
    cider, cider_per_image = metrics.cider(predictions, references, "java" if java_tokenizer else "python")
    model, preprocess, tokenizer = clip
    clip_mean, clip_scores = metrics.clip_score(paths, [predictions[k] for k in keys], model, preprocess, tokenizer,
                                                batch_size=batch_size, device=device, num_workers=num_workers)
    per_image = OrderedDict((k, {"caption": predictions[k], "cider": cider_per_image[k], "clipscore": s})
                            for k, s in zip(keys, clip_scores))
    return {"CIDEr": cider, "CLIPScore": clip_mean, "per_image": per_image}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    course = parser.add_argument_group("the course's arguments")
    course.add_argument("--pred_file", required=True, help="prediction JSON {file name without extension: caption}")
    course.add_argument("--images_root", default="hw3_data/p2_data/images/val", help="folder of the images")
    course.add_argument("--annotation_file", default="hw3_data/p2_data/val.json",
                        help="COCO-style ground truth (images: file_name, id; annotations: image_id, caption)")
    clip = parser.add_argument_group("CLIPScore")
    clip.add_argument("--clip-model", default="ViT-B-32",
                      help="open_clip model name or model-config JSON path (the course uses ViT-B/32)")
    clip.add_argument("--clip-pretrained", default="openai",
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
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    pretrained = None if (args.clip_pretrained or "").lower() in ("", "none") else args.clip_pretrained
    result = evaluate(args.pred_file, args.annotation_file, args.images_root, clip_model=args.clip_model,
                      clip_pretrained=pretrained, batch_size=args.batch_size, device=device,
                      java_tokenizer=args.java_tokenizer, num_workers=args.num_workers)
    if args.per_image:  # {key: {"caption", "cider", "clipscore"}}: what p3_visualize.py --from-scores reads
        write_json(args.per_image, result["per_image"])
    print("CIDEr: %s | CLIPScore: %s" % (result["CIDEr"], result["CLIPScore"]))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    run_main(main)
