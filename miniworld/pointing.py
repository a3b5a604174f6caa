"""The attention pointing game, a measure only the miniature world can give (it knows where every object is): for
each shape word preceded by a colour word naming an object of the scene, does the peak of that word's
cross-attention map fall inside the object's box?

It reads the maps through the product's hook (Captioner.generate(..., return_attention=True) and
Captioner.attention_maps, the maps P3 draws) with the decoding p2_inference.py would use.

    python3 -m miniworld.pointing --images W/p2/images/val --objects W/p2/val_objects.json \
        --checkpoint miniworld/models/p2_lora.pt --decoder miniworld/models/decoder_model.bin --out pointing.json
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from hw3.models import decoding
from hw3.models.captioner import config_path, load_captioner
from hw3.data.images import list_images, load_rgb
from hw3.util.device import resolve_device
from hw3.util.errors import progress, run_main
from hw3.util.files import read_json, write_json
from hw3.models.encoder import coordinate_mapper
from hw3.data.tokenizer import BPETokenizer


def peak_position(attention_map: torch.Tensor, shown_size: Tuple[int, int]) -> Tuple[float, float]:
    """(x, y) in pixels of the shown image at the centre of the map's highest patch."""
    h, w = attention_map.shape
    index = int(attention_map.flatten().argmax())
    width, height = shown_size
    return ((index % w + 0.5) * width / w, (index // w + 0.5) * height / h)


def _singular(word: str) -> Tuple[str, ...]:
    return (word, word[:-1], word[:-2]) if word.endswith("s") else (word,)


def pointing_game(words: Sequence[str], maps: torch.Tensor, objects: Sequence[dict], image_size: Tuple[int, int],
                  transform=None) -> Tuple[int, int]:
    """(hits, trials) for one caption. words: its tokens as lower-case text; maps: (L, h, w) over what `transform`
    shows of an image of `image_size`, row k the map of token k; objects: dicts with color, shape and a COCO bbox
    [x, y, width, height] in original image pixels."""
    shown_size, to_original = coordinate_mapper(image_size, transform)
    hits = trials = 0
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
    """The objects of one image from an objects file: {stem: [objects]} or {stem: {"objects": [objects]}}."""
    scene = objects.get(stem)
    return scene.get("objects") if isinstance(scene, dict) else scene


def play(folder: str, objects: dict, checkpoint: str, decoder: str, batch_size: int = 16, device="cpu",
         layer: str = "last", heads: str = "mean") -> Dict[str, object]:
    """The pointing game over every image of `folder` that `objects` describes."""
    captioner, meta = load_captioner(checkpoint, decoder, device=device)
    settings, said = decoding.resolve_decoding({}, meta, config_path(checkpoint))  # as p2_inference.py decodes
    print(said, file=sys.stderr)
    tokenizer = BPETokenizer()
    names = [n for n in list_images(folder) if scene_objects(objects, os.path.splitext(n)[0]) is not None]
    per_image, hits, trials = {}, 0, 0
    for start in progress(range(0, len(names), batch_size), desc="pointing game", unit="batch"):
        batch = names[start:start + batch_size]
        pictures = [load_rgb(os.path.join(folder, n)) for n in batch]
        pixels = torch.stack([captioner.encoder.transform(p) for p in pictures]).to(device)
        all_ids, all_attention = captioner.generate(pixels, settings, return_attention=True)
        for name, image, ids, per_block in zip(batch, pictures, all_ids, all_attention):
            maps = captioner.attention_maps(per_block, layer, heads)
            words = [tokenizer.decode([t]).strip().lower() for t in ids]
            scene = scene_objects(objects, os.path.splitext(name)[0])
            h, t = pointing_game(words, maps, scene, image.size, captioner.encoder.transform)
            per_image[name] = dict(caption=tokenizer.decode(ids).strip(), pointing=[h, t])
            hits, trials = hits + h, trials + t
    return dict(pointing_game=hits / trials if trials else None, pointing_trials=trials, images=per_image)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of the world's images")
    parser.add_argument("--objects", required=True, help="the world's objects file (val_objects.json, objects.json)")
    parser.add_argument("--checkpoint", required=True, help="captioner checkpoint (.pt with its .json beside)")
    parser.add_argument("--decoder", required=True, help="the tiny GPT-2 (miniworld/models/decoder_model.bin)")
    parser.add_argument("--out", required=True, help="JSON: the score, its trials and each image's hits")
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded together")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    result = play(args.images, read_json(args.objects, "objects file"), args.checkpoint, args.decoder,
                  args.batch_size, resolve_device(args.device))
    write_json(args.out, result)
    print("pointing game: %s (%d shape words)" % (
        "n/a" if result["pointing_game"] is None else "%.3f" % result["pointing_game"], result["pointing_trials"]))
    return 0


if __name__ == "__main__":
    run_main(main)
