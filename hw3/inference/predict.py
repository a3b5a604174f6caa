"""P2 inference: captions every image of a folder into {file name without extension: caption} (the course's JSON).

    python3 p2_inference.py IMG_DIR OUT_JSON DECODER_WEIGHTS [--checkpoint CKPT] [--beam-size 3] ...
    python3 p2_inference.py IMG_DIR captions.json DECODER_WEIGHTS --format coco --method sample --captions-per-image 5

`--format coco` writes a COCO caption file instead (N captions per image with --captions-per-image N), which
p2_train.py reads as --train-json: a teacher's captions for a student. The course's format holds one caption per key,
so it refuses N > 1.

Images are read by DataLoader workers, encoded in batches by the frozen ViT, and captioned by the batched beam search
on the decoder's KV cache (search.py). Offline by default: missing encoder weights fail at once and say
to run `bash hw3_download.sh`.
"""
from __future__ import annotations

import os
import sys

if "--allow-download" not in sys.argv:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any hub import: a missing download fails fast, never retries

import argparse
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from hw3.data import caption_files
from hw3.models import decoding, search
from hw3.models.decoding import DecodingSettings
from hw3.models.captioner import Captioner, config_path, load_captioner, read_checkpoint_config
from hw3.data.images import ImageFiles, collate_images, image_batches
from hw3.util.device import autocast, hub_offline, resolve_device
from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import check_output_file, write_json
from hw3.util.resources import HalvingBatches
from hw3.data.tokenizer import shared_tokenizer
from hw3 import REPO_ROOT

DEFAULT_CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "p2_best.pt")
OUTPUT_FORMATS = ("course", "coco")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", help="folder of test images (its sub-folders too; with --captions, the folder the "
                        "caption file's image paths start from)")
    parser.add_argument("output", help="output JSON: {file name without extension: caption}, or COCO with --format")
    parser.add_argument("decoder_weights", help="the course's GPT-2 decoder weights (decoder_model.bin)")
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                       help="trained tensors (.pt) with the model config (.json) beside it (default: %(default)s)")
    model.add_argument("--encoder", default=None,
                       help="override the checkpoint's encoder spec, e.g. to load its weights from a local file: "
                            "timm:NAME@/path/weights.bin")
    model.add_argument("--allow-download", action="store_true",
                       help="let timm/open_clip download missing encoder weights (default: offline, fail fast)")
    data = parser.add_argument_group("which images (default: every image of the folder)")
    data.add_argument("--captions", metavar="FILE", help="caption only the images of a caption file's split (any "
                      "format p2_train.py reads), so the keys match p2_evaluate.py with the same --split")
    data.add_argument("--split", choices=caption_files.SPLITS, default=None,
                      help="with --captions: the split (default: val of a file with splits, the whole of a file "
                           "without; train/val of a file without splits divide it by file-name hash)")
    data.add_argument("--val-fraction", type=float, default=caption_files.VAL_FRACTION,
                      help="with --captions: share of a file without splits that --split val takes")
    decoding.add_decoding_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--format", choices=OUTPUT_FORMATS, default="course",
                        help="course: {file name without extension: caption} (hw3_2.sh's); coco: {\"images\": [{id, "
                             "file_name}], \"annotations\": [{image_id, caption}]}, readable by p2_train.py "
                             "--train-json (default: %(default)s)")
    output.add_argument("--captions-per-image", type=int, default=1,
                        help="captions per image, with --format coco: N draws of --method sample, or the N best "
                             "beams of beam search (N <= --beam-size) (default: %(default)s)")
    run = parser.add_argument_group("runtime")
    run.add_argument("--batch-size", type=int, default=32, help="images per batch")
    run.add_argument("--device", default="auto", help="cuda, cpu, cuda:1... (default: cuda if available)")
    run.add_argument("--fp16", dest="fp16", action="store_true", default=True,
                     help="fp16 autocast on CUDA (default; ignored on CPU)")
    run.add_argument("--no-fp16", dest="fp16", action="store_false", help="full fp32 on CUDA")
    run.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Runtime:
    """Where and how captioning runs: the device, images per batch, image loading processes, fp16 autocast on
    CUDA (ignored on CPU)."""
    device: torch.device
    batch_size: int = 32
    num_workers: int = 0
    fp16: bool = True


def caption_folder(model: Captioner, folder: str, names: List[str], settings: DecodingSettings,
                   runtime: Runtime) -> Tuple[List[str], int]:
    """The captions of `names`, image-major (settings' captions_per_image per image), and how many were cut (reached
    max_len without the end token); sampling is seeded by each image's key, so the captions do not depend on the
    batch size."""
    tokenizer = shared_tokenizer()
    count, device, batch_size = settings.captions_per_image, runtime.device, runtime.batch_size
    loader = torch.utils.data.DataLoader(
        ImageFiles([os.path.join(folder, n) for n in names], model.encoder.transform), batch_size=batch_size,
        shuffle=False, num_workers=min(runtime.num_workers, (len(names) + batch_size - 1) // batch_size),
        collate_fn=collate_images, pin_memory=device.type == "cuda")
    captions: List[Optional[str]] = [None] * (len(names) * count)
    pieces = HalvingBatches("captioning")  # a CUDA out-of-memory error halves the batch
    cut = 0

    def generate(pixels: torch.Tensor, indices: List[int]) -> Tuple[List[List[int]], List[bool]]:
        with torch.no_grad(), autocast(device, runtime.fp16):
            return model.generate(pixels.to(device, non_blocking=True), settings, return_ended=True,
                                  image_keys=[caption_files.image_key(names[i]) for i in indices])

    with progress(total=len(names), desc="captioning", unit="img") as bar:
        for indices, pixels in image_batches(loader):
            pieces_done = pieces(len(indices), lambda s, e: generate(pixels[s:e], indices[s:e]))
            ids = [c for piece, _ in pieces_done for c in piece]
            cut += sum(ended.count(False) for _, ended in pieces_done)
            texts = search.decode_captions(ids, tokenizer)
            for n, index in enumerate(indices):
                captions[index * count:(index + 1) * count] = texts[n * count:(n + 1) * count]
            bar.update(len(indices))
    return captions, cut


def cut_line(cut: int, total: int, max_len: int) -> str:
    """What stderr and results.md say of captions that reached the length limit without their end token."""
    return "%d of %d captions cut at %d tokens (no end token): raise --max-len" % (cut, total, max_len)


def main(argv: Optional[List[str]] = None) -> int:
    run(argv)
    return 0


def run(argv: Optional[List[str]] = None) -> Dict[str, int]:
    """main's work; returns what run_all records of it: captions written, how many were cut, at what length."""
    args = parse_args(argv)
    hub_offline(not args.allow_download)
    if args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--batch-size must be >= 1 and --num-workers >= 0")
    if args.format == "course" and args.captions_per_image != 1:
        raise UserError("--captions-per-image %d needs --format coco: the course's JSON holds one caption per image"
                        % args.captions_per_image)
    check_output_file(args.output, "output JSON")
    if args.split and not args.captions:
        raise UserError("--split %s needs --captions FILE (the caption file whose split it is)" % args.split)
    names = caption_files.find_images(args.images, args.captions, split=args.split, default_split="val",
                                      val_fraction=args.val_fraction)
    settings, said = decoding.resolve_decoding(vars(args), read_checkpoint_config(args.checkpoint),
                                               config_path(args.checkpoint))  # before the slow loading
    device = resolve_device(args.device)
    start = time.time()
    model, _ = load_captioner(args.checkpoint, args.decoder_weights, device=device, encoder_spec=args.encoder)
    print(said, file=sys.stderr)
    loaded = time.time()
    captions, cut = caption_folder(model, args.images, names, settings,
                                   Runtime(device, args.batch_size, args.num_workers, args.fp16))
    max_len = search.effective_max_len(model.decoder, settings.max_len)
    if cut:
        print(cut_line(cut, len(captions), max_len), file=sys.stderr)
    if args.format == "coco":
        count = args.captions_per_image
        info = dict(description="p2_inference.py captions of %s" % os.path.basename(os.path.normpath(args.images)),
                    checkpoint=os.path.basename(args.checkpoint),
                    decoding=dict(settings.as_record(), captions_per_image=count))
        write_json(args.output, caption_files.coco_captions(
            names, [captions[n * count:(n + 1) * count] for n in range(len(names))], info))
    else:
        write_json(args.output, {caption_files.image_key(n): c for n, c in zip(names, captions)})
    took = time.time() - loaded
    print("captioned %d images (%d captions) in %.1f s (%.1f images/s; model loading %.1f s) -> %s" % (
        len(names), len(captions), took, len(names) / max(took, 1e-9), loaded - start, args.output),
        file=sys.stderr)
    return dict(captions=len(captions), cut=cut, max_len=max_len)


if __name__ == "__main__":
    run_main(main)
