"""Captioning metrics, scored as pycocoevalcap scores them: PTB tokenisation (ptb.py, Java-free), then its own
scorer classes on the tokenised corpus -- Bleu (closest reference length), METEOR 1.5 (the jar its wheel ships;
needs Java), Rouge (ROUGE-L, beta 1.2), Cider (CIDEr-D) -- and CLIPScore (2.5 * max(cos, 0) with CLIP ViT-B/32, as
the course) and RefCLIPScore (Hessel et al.: the harmonic mean of CLIPScore and the best reference text cosine).
`evaluate` checks a prediction file against the references first, as the course's p2_evaluate.py asserts.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import io
import os
import shutil
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from hw3.models import clip_backend
from hw3.evaluation import ptb
from hw3.data.images import ImageFiles, collate_images, image_batches
from hw3.util.errors import UserError, progress
from hw3.util.files import read_json
from hw3.data.caption_files import VAL_FRACTION, image_key, read_captions, resolve_split, split_names
from hw3.util.resources import HalvingBatches

CLIPSCORE_WEIGHT = 2.5
SHOWN_KEYS = 5
# --metrics names and the result keys each gives, in the order results are printed
METRIC_KEYS = OrderedDict([("bleu", ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")), ("meteor", ("METEOR",)),
                           ("rouge", ("ROUGE-L",)), ("cider", ("CIDEr",)), ("clipscore", ("CLIPScore",)),
                           ("refclipscore", ("RefCLIPScore",))])
DEFAULT_METRICS = ("cider", "clipscore")  # the course's line: CIDEr: x | CLIPScore: y
CLIP_METRICS = ("clipscore", "refclipscore")
# "mean": what the course project report (Zhao, Wang and Zhang) picks its checkpoint by
MEAN_OF = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
JAVA_HINT = "install Java (Debian/Ubuntu: apt-get install default-jre-headless)"


def parse_metrics(text: str, option: str = "--metrics") -> Tuple[str, ...]:
    """A comma list of metric names (or "all") -> the names in METRIC_KEYS order."""
    asked = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in asked if t != "all" and t not in METRIC_KEYS]
    if unknown or not asked:
        raise UserError("%s %r: choose from %s, or all" % (option, text, ", ".join(METRIC_KEYS)))
    return tuple(m for m in METRIC_KEYS if m in asked or "all" in asked)


def result_keys(names: Sequence[str]) -> List[str]:
    """The result keys (BLEU-1... RefCLIPScore) of metric names, in print order."""
    return [key for name in METRIC_KEYS if name in names for key in METRIC_KEYS[name]]


class MetricSkipped(Exception):
    """A metric that cannot run here (METEOR without Java): reported in one line, the other metrics still scored."""


def meteor_unavailable() -> Optional[str]:
    """Why METEOR cannot run here, or None: its jar needs a `java` on PATH."""
    if shutil.which("java") is None:
        return "METEOR skipped: pycocoevalcap's meteor-1.5.jar needs Java, and there is no `java` on PATH; %s" \
            % JAVA_HINT
    return None


# ---------------------------------------------------------------------------------------------------------------
# References and predictions
# ---------------------------------------------------------------------------------------------------------------
def load_references(annotation_file: Union[str, dict], split: Optional[str] = None,
                    default_split: Optional[str] = None, val_fraction: float = VAL_FRACTION
                    ) -> Tuple["OrderedDict[str, List[str]]", Dict[str, str]]:
    """({key: captions as written}, {key: image file name}) of a split of a caption file in any format
    (caption_files.read_captions); the key is the file name without folder or extension, as the course's prediction
    files use. `split` None takes `default_split` from a file with splits and the whole of a file without. Images
    left without a caption (every one empty) are left out, and stderr says which."""
    where = annotation_file if isinstance(annotation_file, str) else "annotations"
    caption_file = read_captions(annotation_file, "annotation file")
    names, _ = split_names(caption_file, resolve_split(caption_file, split, default_split), val_fraction)
    references, files = OrderedDict(), {}
    for name in names:
        key = image_key(name)
        if key in references:
            raise UserError("annotation file %s: two images share the key %r (file names without extension must be "
                            "unique)" % (where, key))
        references[key], files[key] = caption_file.captions[name], name
    empty = [k for k, caps in references.items() if not caps]
    if len(empty) == len(references):
        raise UserError("annotation file %s holds no captioned images in the split scored" % where)
    if empty:  # as caption_files.load_captions leaves them out, so p2_inference --captions never captions them
        print("annotation file %s: %d image(s) without a caption left out: %s" % (where, len(empty), _show(empty)),
              file=sys.stderr)
    return (OrderedDict((k, caps) for k, caps in references.items() if caps),
            {k: name for k, name in files.items() if references[k]})


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


@dataclass(frozen=True)
class Scoring:
    """How captions are scored: the metrics asked, the CLIP ((model, preprocess, tokenizer) already loaded, or
    clip_model/clip_pretrained to load when a CLIP metric is asked), images per batch, the device, the PTB
    tokenizer ("python", our port, or "java", the jar) and image loading processes."""
    metrics: Sequence[str] = DEFAULT_METRICS
    clip: Optional[tuple] = None
    clip_model: str = "ViT-B-32"
    clip_pretrained: Optional[str] = "openai"
    batch_size: int = 64
    device: str = "cpu"
    tokenizer: str = "python"
    num_workers: int = 0


def evaluate(pred: Union[str, Dict[str, str]], annotation_file: Union[str, dict], images_root: str,
             scoring: Scoring = Scoring(), split: Optional[str] = None, val_fraction: float = VAL_FRACTION) -> dict:
    """{result key: score for the metrics asked, "per_image": {key: {"caption", metric: score...}}, "skipped":
    {result key: why}} for predictions (a dict or a JSON path) against a split of a caption file (`split` None:
    val of a file with splits, the whole of one without). Everything is checked before any model runs."""
    where = pred if isinstance(pred, str) else "predictions"
    predictions = read_json(pred, "prediction file") if isinstance(pred, str) else pred
    references, files = load_references(annotation_file, split, "val", val_fraction)
    check_predictions(predictions, references, where)
    if not os.path.isdir(images_root):
        raise UserError("images root not found or not a directory: %s" % images_root)
    paths = OrderedDict((k, os.path.join(images_root, files[k])) for k in predictions)
    absent = [files[k] for k, p in paths.items() if not os.path.isfile(p)]
    if absent:
        raise UserError("%d image(s) missing from %s: %s" % (len(absent), images_root, _show(absent)))
    if scoring.clip is None and any(m in CLIP_METRICS for m in scoring.metrics):  # before the text metrics: a
        scoring = dataclasses.replace(scoring, clip=clip_backend.load_clip(  # missing CLIP fails before their work
            scoring.clip_model, scoring.clip_pretrained, scoring.device))
    return score_captions(predictions, references, scoring, paths)


def score_captions(predictions: Dict[str, str], references: Dict[str, List[str]], scoring: Scoring,
                   paths: Optional[Dict[str, str]] = None) -> dict:
    """The metrics asked of predictions {key: caption} against references {key: captions} (and, for the CLIP
    metrics, image paths {key: path} and a loaded CLIP): as `evaluate` returns them. A METEOR that cannot run is
    skipped with one line on stderr saying why; the others are still scored."""
    keys, metrics, clip = list(predictions), scoring.metrics, scoring.clip
    batch_size, device = scoring.batch_size, scoring.device
    result: dict = {"per_image": OrderedDict((k, {"caption": predictions[k]}) for k in keys), "skipped": {}}
    text = [m for m in metrics if m not in CLIP_METRICS]
    if text:
        means, per_image, skipped = text_scores(predictions, references, text, scoring.tokenizer)
        result.update(means)
        result["skipped"].update(skipped)
        for key, scores in per_image.items():
            result["per_image"][key].update(scores)
    if any(m in CLIP_METRICS for m in metrics):
        if clip is None or paths is None:
            raise ValueError("CLIPScore and RefCLIPScore need the images' paths and a loaded CLIP")
        model, _, clip_tokenizer = clip
        captions = [predictions[k] for k in keys]
        clip_mean, clip_each = clip_score([paths[k] for k in keys], captions, clip, batch_size=batch_size,
                                          device=device, num_workers=scoring.num_workers)
        if "clipscore" in metrics:
            result["CLIPScore"] = clip_mean
            for k, s in zip(keys, clip_each):
                result["per_image"][k]["clipscore"] = s
        if "refclipscore" in metrics:
            similarity = reference_similarity(captions, [references[k] for k in keys], model, clip_tokenizer,
                                              batch_size=batch_size, device=device)
            ref_each = [ref_clip_score(c, s) for c, s in zip(clip_each, similarity)]
            result["RefCLIPScore"] = sum(ref_each) / len(ref_each)
            for k, s in zip(keys, ref_each):
                result["per_image"][k]["refclipscore"] = s
    return result


# ---------------------------------------------------------------------------------------------------------------
# BLEU, METEOR, ROUGE-L, CIDEr-D: pycocoevalcap's scorers on the PTB-tokenised corpus
# ---------------------------------------------------------------------------------------------------------------
def text_scores(predictions: Dict[str, str], references: Dict[str, List[str]], metrics: Sequence[str],
                tokenizer: str = "python") -> Tuple[Dict[str, float], Dict[str, Dict[str, float]], Dict[str, str]]:
    """({result key: corpus score}, {key: {metric: score}}, {result key: why skipped}) of the text metrics asked
    (bleu, meteor, rouge, cider), all on one PTB tokenisation of predictions and references, as pycocoevalcap's
    COCOEvalCap does. Predictions are tokenised in their own key order, each image's references in the given
    order (order matters only through tokenisation context)."""
    if not predictions:
        raise UserError("no predictions to score")
    keys = list(predictions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise UserError("no reference captions for %d prediction(s): %s" % (len(missing), ", ".join(missing[:5])))
    gts = ptb.tokenize({k: list(references[k]) for k in keys}, tokenizer)
    res = ptb.tokenize({k: [predictions[k]] for k in keys}, tokenizer)
    means: Dict[str, float] = {}
    per_image: Dict[str, Dict[str, float]] = OrderedDict((k, {}) for k in keys)
    skipped: Dict[str, str] = {}
    for name in (m for m in METRIC_KEYS if m in metrics):
        try:
            corpus, each = SCORERS[name](gts, res)
        except MetricSkipped as err:
            skipped.update((key, str(err)) for key in METRIC_KEYS[name])
            print(err, file=sys.stderr)
            continue
        for result_key, value, values in zip(METRIC_KEYS[name], corpus, each):
            means[result_key] = float(value)
            for k, v in zip(keys, values):
                per_image[k][result_key.lower()] = float(v)
    return means, per_image, skipped


def _bleu(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu

    with contextlib.redirect_stdout(io.StringIO()):  # its scorer prints its n-gram counts
        corpus, each = Bleu(4).compute_score(gts, res, verbose=0)
    return corpus, each


_METEOR: list = []  # one METEOR Java process, kept for every later scoring: its start takes 10-20 s


def _meteor(gts, res):
    from pycocoevalcap.meteor.meteor import Meteor

    reason = meteor_unavailable()
    if reason:
        raise MetricSkipped(reason)
    if not _METEOR:
        _METEOR.append(Meteor())
        atexit.register(_METEOR.clear)  # the scorer's __del__ ends the Java process
    try:
        corpus, each = _METEOR[0].compute_score(gts, res)
    except (OSError, ValueError) as err:
        _METEOR.clear()
        raise MetricSkipped("METEOR skipped: pycocoevalcap's meteor-1.5.jar did not answer (%s); check that "
                            "`java -Xmx2G -jar` runs here" % (" ".join(str(err).split())[:100] or type(err).__name__))
    return [corpus], [each]


def _rouge(gts, res):
    from pycocoevalcap.rouge.rouge import Rouge

    corpus, each = Rouge().compute_score(gts, res)
    return [corpus], [each]


def _cider(gts, res):
    from pycocoevalcap.cider.cider import Cider

    corpus, each = Cider().compute_score(gts, res)
    return [corpus], [each]


SCORERS = {"bleu": _bleu, "meteor": _meteor, "rouge": _rouge, "cider": _cider}


def cider(predictions: Dict[str, str], references: Dict[str, List[str]],
          tokenizer: str = "python") -> Tuple[float, Dict[str, float]]:
    """CIDEr-D as the course computes it (PTBTokenizer, then pycocoevalcap's Cider): (corpus score, per image)."""
    means, per_image, _ = text_scores(predictions, references, ("cider",), tokenizer)
    return means["CIDEr"], {k: s["cider"] for k, s in per_image.items()}


# ---------------------------------------------------------------------------------------------------------------
# CLIPScore
# ---------------------------------------------------------------------------------------------------------------
def clip_score(paths: Sequence[str], captions: Sequence[str], clip: tuple, batch_size: int = 64, device: str = "cpu",
               num_workers: int = 0) -> Tuple[float, List[float]]:
    """CLIPScore = 2.5 * max(cos(image embedding, caption embedding), 0), as in the course's p2_evaluate.py (the
    caption alone, no "A photo depicts" prefix): (mean, per pair) for image files and their captions, with a loaded
    CLIP (model, preprocess, tokenizer). Captions
    longer than the CLIP context are truncated by open_clip's tokenizer (the course's clip.tokenize would raise)."""
    if len(paths) != len(captions):
        raise ValueError("%d images but %d captions" % (len(paths), len(captions)))
    if not len(paths):
        raise UserError("no images to score")
    model, preprocess, tokenizer = clip
    images = clip_image_embeddings(paths, model, preprocess, batch_size, device, num_workers)
    scores = clip_text_scores(images, captions, model, tokenizer, batch_size, device)
    return sum(scores) / len(scores), scores


# CLIP image embeddings computed in this process, per CLIP model (dropped with it): run_all scores every attempt,
# decoding setting and stage row on the same val images, and each of those scorings after the first reuses them. The
# key is the whole request (every file's path, size and modification time, the batch size, the device), so a reuse
# gives the very tensor a fresh computation would (the same batches in the same order) and a changed file misses.
_IMAGE_EMBEDDINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
EMBEDDINGS_KEPT = 4  # requests kept per model (a real val split's rows: 2,481 x 512 floats, 5 MB)


def _file_identity(path: str) -> Optional[tuple]:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # the loader names it
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def clip_image_embeddings(paths: Sequence[str], model, preprocess: Callable, batch_size: int = 64,
                          device: str = "cpu", num_workers: int = 0):
    """CLIP image embeddings (N, D), float32, of image files in order (CLIPScore's image side, and self-critical
    training's CLIP reward caches them for the whole run); the same request again in this process is answered from
    _IMAGE_EMBEDDINGS."""
    files = tuple(_file_identity(p) for p in paths)
    key = (files, batch_size, str(device))
    try:
        kept = _IMAGE_EMBEDDINGS.setdefault(model, OrderedDict())
    except TypeError:  # a model that takes no weak reference: computed every time
        kept = OrderedDict()
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    embeddings = _compute_image_embeddings(paths, model, preprocess, batch_size, device, num_workers)
    if None not in files:
        kept[key] = embeddings
        while len(kept) > EMBEDDINGS_KEPT:
            kept.popitem(last=False)
    return embeddings


def _compute_image_embeddings(paths: Sequence[str], model, preprocess: Callable, batch_size: int, device: str,
                              num_workers: int):
    import torch
    from torch.utils.data import DataLoader

    dtype = next(model.parameters()).dtype
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=num_workers,
                        shuffle=False, collate_fn=collate_images)
    rows, pieces = [], HalvingBatches("CLIP image embeddings")
    with torch.no_grad():
        for _, pixels in image_batches(progress(loader, desc="CLIP images", unit="batch", leave=False)):
            rows += pieces(len(pixels), lambda s, e: model.encode_image(pixels[s:e].to(device=device,
                                                                                        dtype=dtype)).float())
    return torch.cat(rows)


def clip_text_scores(image_embeddings, captions: Sequence[str], model, tokenizer: Callable, batch_size: int = 64,
                     device: str = "cpu") -> List[float]:
    """2.5 * max(cos, 0) of each caption against its row of image_embeddings (N, D)."""
    import torch

    def score(start: int, end: int) -> List[float]:
        text_emb = model.encode_text(tokenizer(list(captions[start:end])).to(device)).float()
        image_emb = image_embeddings[start:end].to(text_emb.device)
        cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        return (CLIPSCORE_WEIGHT * cos.clamp(min=0)).tolist()

    with torch.no_grad():
        pieces = HalvingBatches("CLIPScore captions", batch_size)
        return [v for piece in pieces(len(captions), score) for v in piece]


def reference_similarity(captions: Sequence[str], references: Sequence[Sequence[str]], model, tokenizer: Callable,
                         batch_size: int = 64, device: str = "cpu") -> List[float]:
    """For each caption, the largest cosine between its CLIP text embedding and its references' (the text side of
    RefCLIPScore), with the same text encoding as clip_score (no prefix)."""
    import torch

    flat = [r for refs in references for r in refs]
    embeddings = []
    with torch.no_grad():
        for texts in (list(captions), flat):
            out = []
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size]).to(device)
                out.append(torch.nn.functional.normalize(model.encode_text(batch).float(), dim=-1))
            embeddings.append(torch.cat(out))
    candidates, refs = embeddings  # (N, D), (R, D)
    similarity, start = [], 0
    for i, group in enumerate(references):
        similarity.append(float((refs[start:start + len(group)] @ candidates[i]).max()))
        start += len(group)
    return similarity


def ref_clip_score(clip_score_value: float, similarity: float) -> float:
    """RefCLIP-S = H-Mean(CLIP-S, max(max_r cos(c, r), 0)) (Hessel et al. 2021, eq. 2); 0 when both are 0."""
    text = max(similarity, 0.0)
    total = clip_score_value + text
    return 2 * clip_score_value * text / total if total > 0 else 0.0
