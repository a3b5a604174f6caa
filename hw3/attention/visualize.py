"""P3: the cross-attention of every generated token over the image patches, drawn in the homework's template.

For each image: the caption from the same decoding as p2_inference.py, then a grid whose first panel is the image
under the start token and whose other panels overlay one token's attention map (patch grid upsampled to the image)
on it, ending with the end token. One PNG per image, plus index.md / index.html for the report.

attention.json also says, per generated token (the panels' tokens, end token included), how concentrated its map is,
measures that need no labels: "top10_share", the share of the map's mass on its ceil(10% of N) strongest of N
patches (a uniform map gives ceil(N/10)/N, 0.1 when N is a multiple of 10; a one-hot map 1), and "entropy", the
map's entropy over log(N) (1 uniform, 0 one patch). Each map is first normalised over the patches, as it is drawn
(the CLS/register tokens' share left out). "word" is the whole word a piece belongs to, null for the end token.
"""
from __future__ import annotations

import argparse
import html
import math
import os
import sys
import textwrap
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from hw3.data import caption_files
from hw3.models import decoding
from hw3.models.captioner import config_path, load_captioner, no_attention_reason, read_checkpoint_config
from hw3.models.registry import ARCHITECTURES
from hw3.data.images import load_rgb
from hw3.util.device import resolve_device
from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import atomic_dir, atomic_write, check_output_dir, read_json, write_json
from hw3.models.encoder import coordinate_mapper
from hw3.report.layout import drawable, readable
from hw3.data.tokenizer import shared_tokenizer

END_TEXT = "<|endoftext|>"
CONTINUATION_MARK = "##"  # a word piece that continues the previous token's word
PANEL_INCHES = 2.3
MAX_COLUMNS = 6
COLORMAP = "jet"
OVERLAY_ALPHA = 0.5
PANEL_GAP = 0.05  # between panels, as a share of a panel's width
LABEL_INCHES = 0.3  # above each row of panels: the token labels
BAR_INCHES = 0.9  # right of the panels: the colour bar, its ticks and its label
MARGIN_INCHES = 0.15
TITLE_POINTS = 12
TITLE_CHAR_WIDTH = 0.62  # a DejaVu Sans character is at most about this many font sizes wide on average (lower case)
TOP_PERCENT = 10  # "top10_share": the mass on the strongest 10% of patches


# ----------------------------------------------------------------------------------------------- panels

def token_labels(ids: Sequence[int], tokenizer, ended: bool) -> List[str]:
    """Panel titles: each token as text; a piece that continues a word is marked '##piece'."""
    labels = []
    for i, token in enumerate(ids):
        text = tokenizer.decode([token])
        starts_word = i == 0 or text[:1].isspace() or not text[:1].isalnum()
        labels.append(text.strip() if starts_word else CONTINUATION_MARK + text.strip())
    return labels + ([END_TEXT] if ended else [])


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


# ----------------------------------------------------------------------------------------------- concentration

def patch_distributions(maps: torch.Tensor) -> torch.Tensor:
    """(L, h, w) -> (L, N) rows summing to 1, in float64 so the measures of a near-one-hot map stay exact."""
    flat = maps.flatten(1).double()
    return flat / flat.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def top_share(maps: torch.Tensor, percent: int = TOP_PERCENT) -> torch.Tensor:
    """(L, h, w) -> (L,): the share of each map on its ceil(percent% of N) strongest patches (at least one). Integer
    arithmetic for the count, since ceil(0.1 * 30) is 4 in floating point."""
    flat = patch_distributions(maps)
    k = max(1, -(-flat.shape[-1] * percent // 100))
    return flat.topk(k, dim=-1).values.sum(-1)


def normalised_entropy(maps: torch.Tensor) -> torch.Tensor:
    """(L, h, w) -> (L,): entropy over log(N), so grids of any size compare: 1 uniform, 0 one patch (0 log 0 = 0)."""
    flat = patch_distributions(maps)
    if flat.shape[-1] < 2:
        return torch.zeros(flat.shape[0], dtype=flat.dtype)
    entropy = -(flat * flat.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(-1)
    return (entropy / math.log(flat.shape[-1])).clamp(0.0, 1.0)


def whole_words(labels: Sequence[str], ended: bool) -> List[Optional[str]]:
    """The word each panel's token belongs to ('##' pieces joined to the piece they continue); None for the end
    token, which is no word."""
    pieces = list(labels[:-1] if ended else labels)
    groups: List[List[int]] = []  # indices of one word's pieces
    for i, label in enumerate(pieces):
        if label.startswith(CONTINUATION_MARK) and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    words: List[Optional[str]] = [None] * len(pieces)
    for group in groups:
        word = "".join(pieces[i][len(CONTINUATION_MARK):] if pieces[i].startswith(CONTINUATION_MARK) else pieces[i]
                       for i in group)
        for i in group:
            words[i] = word
    return words + ([None] if ended else [])


def token_stats(labels: Sequence[str], maps: torch.Tensor, ended: bool) -> List[dict]:
    """attention.json's "tokens": per panel token, its word and how concentrated its map is."""
    assert maps.shape[0] == len(labels), (maps.shape, len(labels))
    shares, entropies = top_share(maps), normalised_entropy(maps)
    return [dict(label=label, word=word, top10_share=round(float(share), 6), entropy=round(float(entropy), 6))
            for label, word, share, entropy in zip(labels, whole_words(labels, ended), shares, entropies)]


# ----------------------------------------------------------------------------------------------- drawing

def wrap_title(title: str, width_inches: float, points: int = TITLE_POINTS) -> str:
    """Each line of the title wrapped to what fits the figure's width, so a long caption is never clipped."""
    chars = max(10, int(width_inches * 72 / (points * TITLE_CHAR_WIDTH)))
    return "\n".join("\n".join(textwrap.wrap(line, chars, break_long_words=True) or [""])
                     for line in title.split("\n"))


def draw_figure(image, labels: Sequence[str], maps: torch.Tensor, title: str, path: str) -> None:
    """The figure of make_figure, written as a PNG."""
    import matplotlib.pyplot as plt

    fig = make_figure(image, labels, maps, title)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def make_figure(image, labels: Sequence[str], maps: torch.Tensor, title: str):
    """Start-token panel with the bare image, then one overlay per token; one colour scale and colour bar; the title
    wrapped to the panels' width, with room above them for its lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = image.size
    overlays = upsample(maps, (height, width)).numpy()
    vmax = float(overlays.max()) if overlays.size else 1.0
    panels = 1 + len(labels)
    cols = min(MAX_COLUMNS, panels)
    rows = math.ceil(panels / cols)
    panels_width = PANEL_INCHES * cols
    axis_width = panels_width / (cols + PANEL_GAP * (cols - 1))
    axis_height = axis_width * height / width  # the image fills its panel: the layout is computed, not guessed
    title = drawable(wrap_title(readable(title), panels_width))  # escapes first: they are what takes the width
    title_inches = (title.count("\n") + 1) * TITLE_POINTS * 1.3 / 72 + MARGIN_INCHES
    fig_width = MARGIN_INCHES + panels_width + BAR_INCHES
    fig_height = title_inches + rows * (LABEL_INCHES + axis_height) + MARGIN_INCHES
    top, bottom = 1 - (title_inches + LABEL_INCHES) / fig_height, MARGIN_INCHES / fig_height
    fig, axes = plt.subplots(rows, cols, figsize=(fig_width, fig_height), squeeze=False, gridspec_kw=dict(
        left=MARGIN_INCHES / fig_width, right=(MARGIN_INCHES + panels_width) / fig_width, top=top, bottom=bottom,
        wspace=PANEL_GAP, hspace=LABEL_INCHES / axis_height))
    mappable = None
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= panels:
            continue
        ax.imshow(image)
        if k == 0:
            ax.set_title(drawable(END_TEXT), fontsize=10)
            continue
        mappable = ax.imshow(overlays[k - 1], cmap=COLORMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=vmax,
                             extent=(0, width, height, 0))
        ax.set_title(drawable(labels[k - 1]), fontsize=10)
    fig.suptitle(title, fontsize=TITLE_POINTS, x=(MARGIN_INCHES + panels_width / 2) / fig_width,
                 y=1 - MARGIN_INCHES / 2 / fig_height, va="top")
    if mappable is not None:
        bar_axis = fig.add_axes(((MARGIN_INCHES + panels_width + 0.15) / fig_width, bottom, 0.12 / fig_width,
                                 top - bottom))
        fig.colorbar(mappable, cax=bar_axis).set_label("attention probability", fontsize=8)
    return fig


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
    """(image path, score or None) for every image to draw; a folder's images are found as caption_files.find_images
    finds them (its sub-folders too)."""
    if args.from_scores:
        if not args.images or len(args.images) != 1 or not os.path.isdir(args.images[0]):
            raise UserError("--from-scores needs --images to be the one folder holding the scored images (in it or "
                            "its sub-folders)")
        folder = args.images[0]
        names = {caption_files.image_key(n): n for n in caption_files.find_images(folder)}
        out = []
        for key, score in select_from_scores(args.from_scores, args.top, args.bottom):
            if key not in names:
                raise UserError("%s scores image %r, which is not in %s" % (args.from_scores, key, folder))
            out.append((os.path.join(folder, names[key]), score))
        return out
    out, seen = [], {}
    for item in args.images:
        if os.path.isdir(item):
            paths = [os.path.join(item, n) for n in caption_files.find_images(item)]
        elif os.path.isfile(item):
            paths = [item]
        else:
            raise UserError("--images: no such file or folder: %s" % item)
        for path in paths:
            stem = caption_files.image_key(path)
            if stem in seen:
                raise UserError("--images: %s and %s would both be drawn as %s.png" % (seen[stem], path, stem))
            seen[stem] = path
            out.append((path, None))
    return out


def _layer(text: str) -> str:
    if text in ("last", "mean") or text.lstrip("-").isdigit():
        return text
    raise argparse.ArgumentTypeError("'last', 'mean' or a block index, not %r" % text)


def _heads(text: str) -> str:
    if text in ("mean", "max") or text.lstrip("-").isdigit():
        return text
    raise argparse.ArgumentTypeError("'mean', 'max' or a head index, not %r" % text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("a whole number >= 1, not %r" % text)
    return int(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images (their "
                    "sub-folders too)")
    io.add_argument("--checkpoint", required=True, help="trained captioner checkpoint (.pt with its .json beside)")
    io.add_argument("--decoder", required=True, help="GPT-2 decoder weights (the course's decoder_model.bin)")
    io.add_argument("--out", required=True, help="folder for the PNGs, index.md / index.html and attention.json; it "
                    "appears complete or not at all (an earlier P3 folder there is replaced)")
    pick = parser.add_argument_group("best and worst by CLIPScore")
    pick.add_argument("--from-scores", help="p2_evaluate.py --per-image JSON; draws the --top best and --bottom worst")
    pick.add_argument("--top", type=int, default=1, help="how many of the best images to draw")
    pick.add_argument("--bottom", type=int, default=1, help="how many of the worst images to draw")
    view = parser.add_argument_group("what to draw")
    view.add_argument("--layer", type=_layer, default="last",
                      help="'last' block with cross-attention, 'mean' of them, or a block index")
    view.add_argument("--heads", type=_heads, default="mean", help="'mean', 'max' or a head index")
    decoding.add_decoding_arguments(parser)
    run = parser.add_argument_group("runtime")
    run.add_argument("--batch-size", type=_positive, default=16, help="images decoded together")
    run.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def visualise_one(args, captioner, tokenizer, picture: Tuple[str, Optional[float], object], caption: tuple,
                  out: str) -> dict:
    """Draws one image's figure into `out`; returns its index entry. picture: (path, its score or None, the image);
    caption: (its token ids, their per-block cross-attention as generate returns them)."""
    (path, score, image), (ids, per_block) = picture, caption
    maps = captioner.attention_maps(per_block, args.layer, args.heads)  # (L, h, w)
    ended = maps.shape[0] == len(ids) + 1
    labels = token_labels(ids, tokenizer, ended=ended)
    caption = tokenizer.decode(ids).strip()
    figure = os.path.splitext(os.path.basename(path))[0] + ".png"
    title = caption if score is None else "%s\nCLIPScore %.4f" % (caption, score)
    draw_figure(full_resolution_view(image, captioner.encoder.transform), labels, maps, title,
                os.path.join(out, figure))
    return dict(image=os.path.basename(path), caption=caption, figure=figure, score=score,
                tokens=token_stats(labels, maps, ended))


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_dir(args.out, "attention.json", "P3 figures")
    images = resolve_images(args)
    device = resolve_device(args.device)
    arch = read_checkpoint_config(args.checkpoint)["arch"]
    if ARCHITECTURES[arch].no_attention:  # before any model is built: it has nothing to draw
        raise UserError("%s: %s" % (args.checkpoint, no_attention_reason(arch)))
    captioner, meta = load_captioner(args.checkpoint, args.decoder, device=device)
    settings, said = decoding.resolve_decoding(vars(args), meta, config_path(args.checkpoint))  # as p2_inference.py
    print(said, file=sys.stderr)
    tokenizer = shared_tokenizer()
    entries = []
    with atomic_dir(args.out, "attention.json", "P3 figures") as out, \
            progress(total=len(images), desc="attention maps", unit="image") as bar:
        for start in range(0, len(images), args.batch_size):
            batch = images[start:start + args.batch_size]
            pictures = [load_rgb(path) for path, _ in batch]
            pixels = torch.stack([captioner.encoder.transform(p) for p in pictures]).to(device)
            all_ids, all_attention = captioner.generate(pixels, settings, return_attention=True)
            for (path, score), image, ids, per_block in zip(batch, pictures, all_ids, all_attention):
                entries.append(visualise_one(args, captioner, tokenizer, (path, score, image), (ids, per_block), out))
                bar.update(1)
        write_index(out, entries)
        write_json(os.path.join(out, "attention.json"), dict(figures=entries, layer=args.layer, heads=args.heads))
    print("%d images in %s (PNGs, index.md, index.html, attention.json)" % (len(entries), args.out))
    return 0


if __name__ == "__main__":
    run_main(main)
