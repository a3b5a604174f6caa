"""What a run needs of the machine, and what happens when it runs out: the disk space a run_all.py run still needs
(estimated before any work and refused when short), a full disk named in one line, the peak GPU memory of each
default batch on the grader's 11 GB card (an estimate from the model sizes; docs/gpu-day.md), and CUDA out-of-memory
errors met by halving the batch that hit them.

Both out-of-memory spellings are recognised: torch 1.12's `RuntimeError: CUDA out of memory...` and the later
`torch.cuda.OutOfMemoryError` (a RuntimeError subclass, absent on 1.12).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import sys
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch

from hw3.util.errors import UserError

GB = 2 ** 30
MB = 2 ** 20
CARD_BYTES = 11 * GB  # the grader's RTX 2080 Ti (docs/gpu-day.md)
DISK_MARGIN = 1.1  # the estimate leaves a tenth for logs, figures and the rest
FP32, FP16 = 4, 2
ADAM_BYTES = 3 * FP32  # a trained parameter's state file: the weights and Adam's two moments
GRAD_BYTES = FP32 + ADAM_BYTES  # on the GPU: the weights, their gradient and Adam's moments
ACTIVATION_BYTES_PER_WIDTH = 34  # per token, layer and channel in fp16 (Korthikanti et al. 2022, without recompute)
ATTENTION_BYTES_PER_SCORE = 5  # per token, layer, head and attended position in fp16 (the same estimate)
LOGIT_BYTES = FP16 + 2 * FP32  # per target position and vocabulary entry: fp16 logits, the fp32 loss copy, its grad
PREDICTION_BYTES = 256  # one caption in a prediction JSON, with its key
# timm ViT size words: (width, layers, heads); the token count comes from the name's patch and image size.
VIT_SIZES = dict(tiny=(192, 12, 3), small=(384, 12, 6), base=(768, 12, 12), large=(1024, 24, 16),
                 huge=(1280, 32, 16), giant=(1408, 40, 16))
VIT_NAME = re.compile(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)(?:_[a-z0-9]+)*?_(?P<image>\d{3})")
UNKNOWN_ENCODER_WIDTH = 768  # the image tokens' width the estimates assume when the encoder's name does not say
COURSE_TRAINABLE_LIMIT = 35_000_000  # an opt-in stage's training without a P2 attempt to size it: at most this
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- out of memory

def out_of_memory_error() -> type:
    """torch.cuda.OutOfMemoryError, or RuntimeError on torch 1.12 (which raises a RuntimeError with the message)."""
    return getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


def is_out_of_memory(err: BaseException) -> bool:
    """Either spelling of a CUDA out-of-memory error."""
    error = out_of_memory_error()
    return (error is not RuntimeError and isinstance(err, error)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err))


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Out-of-memory halvings outside training (feature cache, inference, scoring) since the last drain: run_all moves
# them into its log.
EVENTS: List[dict] = []


def halved(batch_size: int, what: str, err: BaseException) -> int:
    """The batch size after an out-of-memory error, said on stderr and kept in EVENTS; the error again when the
    batch is already 1."""
    if batch_size <= 1:
        raise err
    release_memory()
    smaller = batch_size // 2
    print("out of GPU memory in %s at batch %d: going on with batch %d" % (what, batch_size, smaller),
          file=sys.stderr, flush=True)
    EVENTS.append(dict(where=what, batch_size=smaller))
    return smaller


class HalvingBatches:
    """Runs a batch in pieces of at most `size` rows, halving `size` after an out-of-memory error and going on from
    the piece that failed; the smaller size holds for the later batches too."""

    def __init__(self, what: str, size: Optional[int] = None):
        self.what, self.size = what, size

    def __call__(self, rows: int, run: Callable[[int, int], T]) -> List[T]:
        """[run(start, end) for each piece of range(rows)], in order."""
        size = min(self.size or rows, rows)
        out, start = [], 0
        while start < rows:
            end = min(rows, start + size)
            try:
                out.append(run(start, end))
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                size = self.size = halved(size, self.what, err)
                continue
            start = end
        return out


# ----------------------------------------------------------------------------------------------- a full disk

def free_bytes(path: str) -> int:
    """Free space where `path` is (or would be created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def disk_full(err: BaseException) -> Optional[OSError]:
    """The ENOSPC (or EDQUOT) OSError behind `err`, through its causes: torch.save's RuntimeError hides it."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def disk_full_line(path: str, what: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    return ("the disk is full: writing %s (%s) in %s failed with %.2f GB free there; nothing half-written was "
            "kept: free some space and run the same command again, it goes on from the last finished step"
            % (os.path.basename(path), what, folder, free_bytes(folder) / GB))


# ----------------------------------------------------------------------------------------------- model sizes

def vit_shape(encoder: str) -> Optional[Dict[str, int]]:
    """tokens, width, layers, heads and parameters of a timm ViT named in the usual way, with the spec's own
    img_size, patch_size, embed_dim, depth and num_heads over the name's; None for other encoders."""
    from hw3.models.encoder import EncoderSpec  # models import this module

    match = VIT_NAME.search(encoder or "")
    if not match or match.group("size") not in VIT_SIZES:
        return None
    width, layers, heads = VIT_SIZES[match.group("size")]
    image, patch = int(match.group("image")), int(match.group("patch"))
    try:
        options = dict(EncoderSpec.parse(encoder).options)
    except UserError:
        options = {}
    given = lambda key, default: options[key] if isinstance(options.get(key), int) else default
    width, layers, heads = given("embed_dim", width), given("depth", layers), given("num_heads", heads)
    side = given("img_size", image) // given("patch_size", patch)
    return dict(tokens=side * side + 1, width=width, layers=layers, heads=heads, parameters=12 * layers * width ** 2)


def decoder_shape(decoder) -> Dict[str, int]:
    """The sizes the estimates use, from a built decoder: its parameters and, for a transformer, its layers."""
    cfg = decoder.cfg
    summary = decoder.parameter_summary()
    width = getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size", None) or getattr(cfg, "embed_dim", 512)
    return dict(trainable=summary["trainable"], frozen=summary.get("frozen", 0), width=int(width),
                layers=int(getattr(cfg, "n_layer", 1) or 1), heads=int(getattr(cfg, "n_head", 1) or 1),
                vocab=int(getattr(cfg, "vocab_size", 0) or 50257))


def training_peak_bytes(decoder: Dict[str, int], image: Optional[Dict[str, int]], batch: int, caption_tokens: int,
                        cached_features: bool) -> int:
    """A training step's peak GPU memory in fp16 autocast: the weights (fp32), the trained ones' gradients and Adam
    moments, the activations per caption token and layer (self- and cross-attention scores included), the logits
    and the image tokens; the frozen encoder too when it runs at every step."""
    tokens = image["tokens"] if image else 1
    per_token = decoder["layers"] * (ACTIVATION_BYTES_PER_WIDTH * decoder["width"]
                                     + ATTENTION_BYTES_PER_SCORE * decoder["heads"] * (caption_tokens + tokens))
    total = (decoder["frozen"] * FP32 + decoder["trainable"] * GRAD_BYTES
             + batch * caption_tokens * (per_token + decoder["vocab"] * LOGIT_BYTES))
    if image:
        total += batch * tokens * image["width"] * FP16
        if not cached_features:
            total += encoding_peak_bytes(image, batch)
    return int(total)


def encoding_peak_bytes(image: Dict[str, int], batch: int) -> int:
    """The frozen encoder under no_grad: its weights (fp32) and about two layers' activations at a time."""
    per_image = image["tokens"] * (ACTIVATION_BYTES_PER_WIDTH * image["width"]
                                   + ATTENTION_BYTES_PER_SCORE * image["heads"] * image["tokens"])
    return int(image["parameters"] * FP32 + 2 * batch * per_image)


def disk_need(images: int, image: Optional[Dict[str, int]], cached: int, trainings: Sequence[int],
              predictions: int) -> Dict[str, int]:
    """Bytes still needed: the feature cache (fp16 rows, less what is there), per training still to run its best.pt,
    the largest training's state file (run_all removes a training's state once it has finished, so one is there at
    a time), and the prediction files."""
    cache = max(0, images * image["tokens"] * image["width"] * FP16 - cached) if image else 0
    return dict(feature_cache=cache, checkpoints=sum(t * FP32 for t in trainings),
                states=max(trainings, default=0) * ADAM_BYTES, predictions=predictions * PREDICTION_BYTES)


def check_disk(folder: str, need: Dict[str, int]) -> str:
    """The estimate as one line of the plan; a UserError, before any work, when the disk is short."""
    total = int(sum(need.values()) * DISK_MARGIN)
    free = free_bytes(folder)
    parts = ", ".join("%s %.2f GB" % (k.replace("_", " "), v / GB) for k, v in need.items())
    if total > free:
        raise UserError("not enough disk space for this run in %s: it still needs about %.2f GB (%s, and a tenth "
                        "more), %.2f GB are free; free some space or choose another --out"
                        % (folder, total / GB, parts, free / GB))
    return "disk: about %.2f GB still needed (%s, and a tenth more), %.2f GB free in %s" % (
        total / GB, parts, free / GB, folder)


def folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


# ----------------------------------------------------------------------------------------------- run_all's plan

def plan_lines(ctx, selected: Sequence[str]) -> List[str]:
    """run_all's plan lines: the disk the run still needs (refused now when short) and each P2 attempt's peak GPU
    memory at its batch sizes on an 11 GB card. Estimates from the model sizes, not measurements."""
    from hw3.models.encoder import DEFAULT_ENCODER

    image = vit_shape(ctx.args.encoder or DEFAULT_ENCODER)
    shapes = ModelShapes(ctx.train_output_ids, image["width"] if image else UNKNOWN_ENCODER_WIDTH)
    methods = [m for m in ctx.args.methods if m in ctx.train_options and "p2" in selected]
    lines = [gpu_line(ctx, method, shapes(ctx.train_options[method]), image) for method in methods]
    trainings = [shapes(ctx.train_options[m])["trainable"] for m in methods
                 if not _finished(ctx, "p2", m, ctx.forced("p2"))]
    largest = max([shapes(ctx.train_options[m])["trainable"] for m in methods] or [COURSE_TRAINABLE_LIMIT])
    trainings += stage_trainings(ctx, selected, shapes, largest)
    images = planned_images(ctx, selected)
    cache = ctx.path("p2", "feature_cache")
    need = disk_need(images if not ctx.args.no_feature_cache else 0, image,
                     folder_bytes(cache) if os.path.isdir(cache) else 0, trainings,
                     predictions=images * 8)
    return [check_disk(ctx.out, need)] + lines


class ModelShapes:
    """decoder_shape of the decoder that parsed p2_train.py options describe, each distinct config built once: with
    cross-attention from image tokens `encoder_dim` wide, and a from-scratch decoder with the compact output layer of
    `output_ids()` (the training captions' ids)."""

    def __init__(self, output_ids: Callable[[], Sequence[int]], encoder_dim: int):
        self.output_ids, self.encoder_dim = output_ids, encoder_dim
        self.known: Dict[str, Dict[str, int]] = {}

    def __call__(self, options) -> Dict[str, int]:
        from hw3.models import registry

        from_scratch = registry.ARCHITECTURES[options.arch].from_scratch
        config = registry.config_from_args(options, self.output_ids() if from_scratch else None)
        config = dataclasses.replace(config, encoder_dim=self.encoder_dim)  # as captioner.build_captioner sets it
        key = repr(config)
        if key not in self.known:
            self.known[key] = decoder_shape(registry.decoder_from_config(config))
        return self.known[key]


def gpu_line(ctx, method: str, shape: Dict[str, int], image: Optional[Dict[str, int]]) -> str:
    """One P2 attempt's peak GPU memory (estimate) at its training and encoding batch sizes."""
    options = ctx.train_options[method]
    caption_tokens = (options.max_caption_tokens or ctx.scoring_max_len()) + 2  # None: the data's, as val's
    peaks = [("training batch %d" % options.batch_size, training_peak_bytes(
        shape, image, options.batch_size, caption_tokens, bool(options.feature_cache)))]
    if image:
        peaks.append(("encoding batch %d" % options.encode_batch_size,
                      encoding_peak_bytes(image, options.encode_batch_size)))
    return "GPU memory (estimate, fp16): %s: %s of an 11 GB card" % (method, ", ".join(
        "%s %.1f GB%s" % (what, peak / GB, " (over: lower it)" if peak > CARD_BYTES else "") for what, peak in peaks))


def stage_trainings(ctx, selected: Sequence[str], shapes: ModelShapes, largest: int) -> List[int]:
    """The trained parameters of each opt-in stage's trainings still to run: sized from the options its check read
    (ctx.stage_options; a training it did not name: the largest of its checked ones), else `largest` (P2's
    largest attempt, or the course's limit)."""
    from hw3.pipeline.stage_table import TABLE  # the pipeline imports this module

    trainings = []
    for stage, row in TABLE.items():
        if stage not in selected:
            continue
        checked = {name: shapes(options)["trainable"] for name, options in ctx.stage_options.get(stage, {}).items()}
        default = max(checked.values(), default=largest)
        names = tuple(ctx.args.methods[:1]) if row.trainings is None else row.trainings
        trainings += [checked.get(n, default) for n in names if not _finished(ctx, stage, n, ctx.forced(stage))]
    return trainings


def planned_images(ctx, selected: Sequence[str]) -> int:
    """The images whose features the run caches and captions: train and val (each folder once, a caption file's
    sub-folders too), at most --train-max-images of train."""
    from hw3.data.images import list_images

    def count(folder: str) -> int:  # every image under it: a caption file's sub-folders (Karpathy's filepath) too
        return len(list_images(folder, recursive=True))

    if not {"p2", "compare", "distill"} & set(selected):
        return 0
    folders = sorted({ctx.data(k) for k in ("train_images", "val_images")})  # one folder counted once
    images = sum(count(f) for f in folders)
    if ctx.args.train_max_images:
        images = min(images, ctx.args.train_max_images + count(ctx.data("val_images")))
    return images


def _finished(ctx, stage: str, name: str, forced: bool) -> bool:
    return not forced and os.path.isfile(os.path.join(ctx.out, stage, name, "train", "finished.json"))
