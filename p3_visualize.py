"""P3: the cross-attention of every generated token over the image patches, drawn in the homework's template.

For each image: the caption from the same decoding as p2_inference.py, then a grid whose first panel is the image
under the start token and whose other panels overlay one token's attention map (patch grid upsampled to the image)
on it, ending with the end token. One PNG per image, plus index.md / index.html for the report.
"""
from __future__ import annotations

import argparse
import html
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common import (UserError, atomic_write, list_images, load_rgb, progress, read_json, resolve_device, run_main,
                    write_json)

END_TEXT = "<|endoftext|>"
CONTINUATION_MARK = "##"  # a word piece that continues the previous token's word
PANEL_INCHES = 2.3
MAX_COLUMNS = 6
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5


# ----------------------------------------------------------------------------------------------- attention maps

def reduce_attention(per_block: Sequence[Optional[torch.Tensor]], layer: str = "last",
                     heads: str = "mean") -> torch.Tensor:
    """Per-block (n_head, L, N) probabilities -> one (L, N) map per token.

    layer: "last" (the last block with cross-attention), "mean" (mean over those blocks) or a block index;
    heads: "mean", "max" or a head index."""
    blocks = [(i, a) for i, a in enumerate(per_block) if a is not None]
    if not blocks:
        raise UserError("the decoder has no cross-attention, so there is no attention over the image to draw")
    if layer == "last":
        chosen = blocks[-1][1]
    elif layer == "mean":
        chosen = torch.stack([a for _, a in blocks]).mean(0)
    else:
        index = int(layer) % len(per_block)
        if per_block[index] is None:
            raise UserError("--layer %s: block %d has no cross-attention (blocks with it: %s)" % (
                layer, index, [i for i, _ in blocks]))
        chosen = per_block[index]
    if heads == "mean":
        return chosen.mean(0)
    if heads == "max":
        return chosen.max(0).values
    head = int(heads)
    if not -chosen.shape[0] <= head < chosen.shape[0]:
        raise UserError("--heads %s: the decoder has %d heads" % (heads, chosen.shape[0]))
    return chosen[head]


def patch_maps(attention: torch.Tensor, num_prefix_tokens: int, grid_size: Tuple[int, int]) -> torch.Tensor:
    """(L, N) over all image tokens -> (L, h, w) over the patch grid, CLS/register tokens dropped."""
    h, w = grid_size
    if attention.shape[-1] != num_prefix_tokens + h * w:
        raise ValueError("attention covers %d image tokens, but the encoder has %d prefix tokens + a %dx%d grid" % (
            attention.shape[-1], num_prefix_tokens, h, w))
    return attention[:, num_prefix_tokens:].reshape(-1, h, w)


def token_labels(ids: Sequence[int], tokenizer, ended: bool) -> List[str]:
    """Panel titles: each token as text; a piece that continues a word is marked '##piece'."""
    labels = []
    for i, token in enumerate(ids):
        text = tokenizer.decode([token])
        starts_word = i == 0 or text[:1].isspace() or not text[:1].isalnum()
        labels.append(text.strip() if starts_word else CONTINUATION_MARK + text.strip())
    return labels + ([END_TEXT] if ended else [])


def display_image(image, transform):
    """The image as the encoder saw it: the PIL-to-PIL steps of its transform (resize, crop), not the tensor ones."""
    for step in getattr(transform, "transforms", []):
        if "ToTensor" in type(step).__name__ or "Normalize" in type(step).__name__:
            break
        image = step(image)
    return image


def full_resolution_view(image, transform):
    """The region of the original image that the encoder saw (after its resize and crop), at the original
    resolution, so the figure stays sharp however small the encoder's input is."""
    shown_size, to_original = coordinate_mapper(image.size, transform)
    x0, y0 = to_original(0, 0)
    x1, y1 = to_original(shown_size[0] - 1, shown_size[1] - 1)
    box = (int(round(x0)), int(round(y0)), int(round(x1)) + 1, int(round(y1)) + 1)
    return image.crop(box) if box != (0, 0) + image.size else image


def upsample(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(L, h, w) -> (L, H, W), bilinear, for overlay on an H x W image."""
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)


# ----------------------------------------------------------------------------------------------- drawing

def draw_figure(image, labels: Sequence[str], maps: torch.Tensor, title: str, path: str) -> None:
    """Start-token panel with the bare image, then one overlay per token; one colour scale and colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = image.size
    overlays = upsample(maps, (height, width)).numpy()
    vmax = float(overlays.max()) if overlays.size else 1.0
    panels = 1 + len(labels)
    cols = min(MAX_COLUMNS, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows * height / width + 0.8),
                             squeeze=False)
    mappable = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= panels:
            continue
        ax.imshow(image)
        if k == 0:
            ax.set_title(END_TEXT, fontsize=10)
            continue
        mappable = ax.imshow(overlays[k - 1], cmap=COLORMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=vmax,
                             extent=(0, width, height, 0))
        ax.set_title(labels[k - 1], fontsize=10)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 0.91, 0.96))
    if mappable is not None:
        bar_axis = fig.add_axes((0.92, 0.1, 0.012, 0.78))
        fig.colorbar(mappable, cax=bar_axis).set_label("attention probability", fontsize=8)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_index(out_dir: str, entries: List[dict]) -> None:
    """index.md and index.html listing every figure with its caption (and score), for the report."""
    md = ["# Attention maps", ""]
    rows = []
    for e in entries:
        score = "" if e.get("score") is None else " (CLIPScore %.4f)" % e["score"]
        md += ["## %s%s" % (e["image"], score), "", "*%s*" % e["caption"], "", "![%s](%s)" % (e["image"], e["figure"]),
               ""]
        rows.append('<h2>%s%s</h2><p><i>%s</i></p><img src="%s" style="max-width:100%%">' % (
            html.escape(e["image"]), html.escape(score), html.escape(e["caption"]), html.escape(e["figure"])))
    with atomic_write(os.path.join(out_dir, "index.md")) as f:
        f.write("\n".join(md))
    with atomic_write(os.path.join(out_dir, "index.html")) as f:
        f.write("<!doctype html><meta charset='utf-8'><title>Attention maps</title>\n" + "\n".join(rows) + "\n")


# ----------------------------------------------------------------------------------------------- pointing game

def peak_position(attention_map: torch.Tensor, shown_size: Tuple[int, int]) -> Tuple[float, float]:
    """(x, y) in pixels of the shown image at the centre of the map's highest patch."""
    h, w = attention_map.shape
    index = int(attention_map.flatten().argmax())
    width, height = shown_size
    return ((index % w + 0.5) * width / w, (index // w + 0.5) * height / h)


def coordinate_mapper(image_size: Tuple[int, int], transform):
    """Maps a pixel of the shown (resized, cropped) image back to the original image, whatever the transform's
    geometry: the same steps are applied to ramps that encode x and y in two channels, and read back."""
    import numpy as np
    from PIL import Image

    width, height = image_size
    xs = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    ys = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    ramps = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).round().astype(np.uint8)
    shown = display_image(Image.fromarray(ramps), transform)

    def to_original(x: float, y: float) -> Tuple[float, float]:
        px = min(max(int(x), 0), shown.size[0] - 1)
        py = min(max(int(y), 0), shown.size[1] - 1)
        r, g = shown.getpixel((px, py))[:2]
        return r / 255.0 * (width - 1), g / 255.0 * (height - 1)

    return shown.size, to_original


def _singular(word: str) -> Tuple[str, ...]:
    return (word, word[:-1], word[:-2]) if word.endswith("s") else (word,)


def pointing_game(labels: Sequence[str], maps: torch.Tensor, objects: Sequence[dict], image_size: Tuple[int, int],
                  transform=None) -> Tuple[int, int]:
    """(hits, trials): for each shape word preceded by a colour word naming an object of the scene, does the attention
    peak of that shape word fall inside the object's box (original image pixels)? objects: dicts with color, shape and
    a COCO bbox [x, y, width, height]; maps: (L, h, w) over what `transform` shows of an image of `image_size`."""
    shown_size, to_original = coordinate_mapper(image_size, transform)
    hits = trials = 0
    words = [label.lstrip("#").lower() for label in labels]
    for k in range(1, len(words)):
        matches = [o for o in objects if o["shape"] in _singular(words[k]) and o["color"] == words[k - 1]]
        if not matches:
            continue
        x, y = to_original(*peak_position(maps[k], shown_size))
        trials += 1
        hits += any(o["bbox"][0] <= x <= o["bbox"][0] + o["bbox"][2] and o["bbox"][1] <= y <= o["bbox"][1] + o["bbox"][3]
                    for o in matches)
    return hits, trials


def scene_objects(objects: dict, stem: str) -> Optional[List[dict]]:
    """The objects of one image from an --objects file: {stem: [objects]} or {stem: {"objects": [objects]}}."""
    scene = objects.get(stem)
    return scene.get("objects") if isinstance(scene, dict) else scene


# ----------------------------------------------------------------------------------------------- main

def select_from_scores(path: str, top: int, bottom: int) -> List[Tuple[str, float]]:
    """(image key, CLIPScore) of the best `top` and worst `bottom` images of p2_evaluate.py's --per-image file."""
    scores = read_json(path, "per-image scores file")
    try:
        items = sorted(((k, float(v["clipscore"])) for k, v in scores.items()), key=lambda kv: -kv[1])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UserError("%s: expected {image: {\"clipscore\": ...}} as written by p2_evaluate.py --per-image" % path)
    chosen = items[:top] + [kv for kv in items[::-1][:bottom] if kv not in items[:top]]
    return chosen


def resolve_images(args) -> List[Tuple[str, Optional[float]]]:
    """(image path, score or None) for every image to draw."""
    if args.from_scores:
        if not args.images or len(args.images) != 1 or not os.path.isdir(args.images[0]):
            raise UserError("--from-scores needs --images to be the one folder holding the scored images")
        folder = args.images[0]
        stems = {os.path.splitext(n)[0]: n for n in list_images(folder)}
        out = []
        for key, score in select_from_scores(args.from_scores, args.top, args.bottom):
            if key not in stems:
                raise UserError("%s scores image %r, which is not in %s" % (args.from_scores, key, folder))
            out.append((os.path.join(folder, stems[key]), score))
        return out
    out = []
    for item in args.images:
        if os.path.isdir(item):
            out += [(os.path.join(item, n), None) for n in list_images(item)]
        elif os.path.isfile(item):
            out.append((item, None))
        else:
            raise UserError("--images: no such file or folder: %s" % item)
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images")
    io.add_argument("--checkpoint", required=True, help="trained captioner checkpoint (.pt with its .json beside)")
    io.add_argument("--decoder", required=True, help="GPT-2 decoder weights (the course's decoder_model.bin)")
    io.add_argument("--out", required=True, help="folder for the PNGs and index.md / index.html (created)")
    pick = parser.add_argument_group("best and worst by CLIPScore")
    pick.add_argument("--from-scores", help="p2_evaluate.py --per-image JSON; draws the --top best and --bottom worst")
    pick.add_argument("--top", type=int, default=1, help="how many of the best images to draw")
    pick.add_argument("--bottom", type=int, default=1, help="how many of the worst images to draw")
    view = parser.add_argument_group("what to draw")
    view.add_argument("--layer", default="last", help="'last' block with cross-attention, 'mean' of them, or an index")
    view.add_argument("--heads", default="mean", help="'mean', 'max' or a head index")
    view.add_argument("--no-figures", action="store_true",
                      help="only the captions, the pointing game and attention.json (no PNGs), e.g. for a whole split")
    view.add_argument("--objects", help="JSON {image stem: [{color, shape, bbox}]} (COCO boxes; the miniature world's "
                      "objects files) for the pointing game")
    from captioner import add_decoding_arguments

    add_decoding_arguments(parser)
    dec = parser.add_argument_group("runtime")
    dec.add_argument("--batch-size", type=int, default=16, help="images decoded together")
    dec.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def visualise_one(args, encoder, tokenizer, path: str, score: Optional[float], image, ids: List[int], per_block,
                  objects: Optional[dict]) -> Tuple[dict, Tuple[int, int]]:
    """Draws one image's figure (unless --no-figures) and scores its pointing game; returns (entry, (hits, trials))."""
    attention = reduce_attention(per_block, args.layer, args.heads)  # (L, N)
    ended = attention.shape[0] == len(ids) + 1
    maps = patch_maps(attention, encoder.num_prefix_tokens, encoder.grid_size)
    labels = token_labels(ids, tokenizer, ended)
    caption = tokenizer.decode(ids).strip()
    stem = os.path.splitext(os.path.basename(path))[0]
    figure = None if args.no_figures else stem + ".png"
    if figure:
        title = caption if score is None else "%s\nCLIPScore %.4f" % (caption, score)
        draw_figure(full_resolution_view(image, encoder.transform), labels, maps, title, os.path.join(args.out, figure))
    entry = dict(image=os.path.basename(path), caption=caption, figure=figure, score=score)
    scene = scene_objects(objects, stem) if objects is not None else None
    if scene is None:
        return entry, (0, 0)
    hits, trials = pointing_game(labels, maps, scene, image.size, encoder.transform)
    entry["pointing"] = [hits, trials]
    return entry, (hits, trials)


def main(argv=None) -> int:
    args = parse_args(argv)
    from captioner import load_captioner, resolve_decoding
    from tokenizer import BPETokenizer

    images = resolve_images(args)
    objects = read_json(args.objects, "--objects file") if args.objects else None
    device = resolve_device(args.device)
    captioner, meta = load_captioner(args.checkpoint, args.decoder, device=device)
    settings, said = resolve_decoding(vars(args), meta, args.checkpoint)  # the same decoding as p2_inference.py
    print(said, file=sys.stderr)
    encoder, tokenizer = captioner.encoder, BPETokenizer()
    entries, hits, trials = [], 0, 0
    bar = progress(total=len(images), desc="attention maps", unit="image")
    for start in range(0, len(images), args.batch_size):
        batch = images[start:start + args.batch_size]
        pictures = [load_rgb(path) for path, _ in batch]
        pixels = torch.stack([encoder.transform(p) for p in pictures]).to(device)
        all_ids, all_attention = captioner.generate(pixels, return_attention=True, **settings)
        for (path, score), image, ids, per_block in zip(batch, pictures, all_ids, all_attention):
            entry, (h, t) = visualise_one(args, encoder, tokenizer, path, score, image, ids, per_block, objects)
            hits, trials = hits + h, trials + t
            entries.append(entry)
            bar.update(1)
    bar.close()
    if not args.no_figures:
        write_index(args.out, entries)
    summary: Dict[str, object] = dict(figures=entries)
    if objects is not None:
        summary["pointing_game"] = hits / trials if trials else None
        summary["pointing_trials"] = trials
        print("pointing game: %s (%d of %d shape words)" % (
            "n/a" if not trials else "%.3f" % (hits / trials), hits, trials))
    write_json(os.path.join(args.out, "attention.json"), summary)
    print("%d images in %s (%s)" % (len(entries), args.out,
                                   "attention.json" if args.no_figures else "PNGs, index.md, index.html"))
    return 0


if __name__ == "__main__":
    run_main(main)
