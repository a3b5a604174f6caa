"""Captioning metrics as the course computes them: CIDEr-D (PTB tokenisation, then pycocoevalcap's Cider) and
CLIPScore (2.5 * max(cos, 0) with CLIP ViT-B/32), and `evaluate`, which checks a prediction file against a COCO
caption file first, as the course's p2_evaluate.py asserts. The Java-free PTB tokeniser is in ptb.py.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import clip_utils
import ptb
from common import ImageFiles, UserError, collate_images, image_batches, progress, read_json
from p2_data import read_coco_captions

CLIPSCORE_WEIGHT = 2.5
SHOWN_KEYS = 5


# ---------------------------------------------------------------------------------------------------------------
# References and predictions
# ---------------------------------------------------------------------------------------------------------------
def load_references(annotation_file: Union[str, dict]) -> Tuple["OrderedDict[str, List[str]]", Dict[str, str]]:
    """({key: captions in annotation order}, {key: image file name}) from a COCO-style caption file; the key is the
    file name without extension, as the course's prediction files use."""
    where = annotation_file if isinstance(annotation_file, str) else "annotations"
    references, files = OrderedDict(), {}
    for name, captions in read_coco_captions(annotation_file).items():
        key = os.path.splitext(os.path.basename(name))[0]
        if key in references:
            raise UserError("annotation file %s: two images share the key %r (file names without extension must be "
                            "unique)" % (where, key))
        references[key], files[key] = captions, name
    empty = [k for k, caps in references.items() if not caps]
    if empty:
        raise UserError("annotation file %s: %d image(s) have no caption: %s" % (where, len(empty), _show(empty)))
    return references, files


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
        clip = clip_utils.load_clip(clip_model, clip_pretrained, device)
    cider_mean, cider_per_image = cider(predictions, references, "java" if java_tokenizer else "python")
    model, preprocess, tokenizer = clip
    clip_mean, clip_scores = clip_score(paths, [predictions[k] for k in keys], model, preprocess, tokenizer,
                                        batch_size=batch_size, device=device, num_workers=num_workers)
    per_image = OrderedDict((k, {"caption": predictions[k], "cider": cider_per_image[k], "clipscore": s})
                            for k, s in zip(keys, clip_scores))
    return {"CIDEr": cider_mean, "CLIPScore": clip_mean, "per_image": per_image}


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------------------------
def cider(predictions: Dict[str, str], references: Dict[str, List[str]],
          tokenizer: str = "python") -> Tuple[float, Dict[str, float]]:
    """CIDEr-D as the course computes it (PTBTokenizer, then pycocoevalcap's Cider): (corpus score, per image).

    Order matters only through tokenisation context, so predictions are scored in their own key order, each image's
    references in the given order, as the course's p2_evaluate.py does."""
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        raise UserError("no predictions to score")
    keys = list(predictions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise UserError("no reference captions for %d prediction(s): %s" % (len(missing), ", ".join(missing[:5])))
    gts = ptb.tokenize({k: list(references[k]) for k in keys}, tokenizer)
    res = ptb.tokenize({k: [predictions[k]] for k in keys}, tokenizer)
    score, scores = Cider().compute_score(gts, res)
    return float(score), {k: float(s) for k, s in zip(gts.keys(), scores)}


# ---------------------------------------------------------------------------------------------------------------
# CLIPScore
# ---------------------------------------------------------------------------------------------------------------
def clip_score(paths: Sequence[str], captions: Sequence[str], model, preprocess: Callable, tokenizer: Callable,
               batch_size: int = 64, device: str = "cpu", num_workers: int = 0) -> Tuple[float, List[float]]:
    """CLIPScore = 2.5 * max(cos(image embedding, caption embedding), 0), as in the course's p2_evaluate.py (the
    caption alone, no "A photo depicts" prefix): (mean, per pair) for image files and their captions. Captions
    longer than the CLIP context are truncated by open_clip's tokenizer (the course's clip.tokenize would raise)."""
    import torch
    from torch.utils.data import DataLoader

    if len(paths) != len(captions):
        raise ValueError("%d images but %d captions" % (len(paths), len(captions)))
    if not len(paths):
        raise UserError("no images to score")
    dtype = next(model.parameters()).dtype
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=num_workers,
                        shuffle=False, collate_fn=collate_images)
    scores = []
    with torch.no_grad():
        for indices, pixels in image_batches(progress(loader, desc="CLIPScore", unit="batch", leave=False)):
            image_emb = model.encode_image(pixels.to(device=device, dtype=dtype)).float()
            text_emb = model.encode_text(tokenizer([captions[i] for i in indices]).to(device)).float()
            cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
            scores.extend((CLIPSCORE_WEIGHT * cos.clamp(min=0)).tolist())
    return sum(scores) / len(scores), scores
