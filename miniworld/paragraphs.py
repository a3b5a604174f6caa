"""The paragraph world: the miniature world's scenes captioned as DeepFashion-MultiModal is, one paragraph per image.

    python3 -m miniworld.paragraphs --out outputs/paragraphs        # captions.json + images/*.jpg (300 images)

Each paragraph opens with the number of shapes, then gives one sentence per object, left to right: its size, colour,
shape and place in a 3 x 3 grid, in one of several phrasings. The file is a DeepFashion `captions.json`
({"IMAGE.jpg": "paragraph", ...}, no splits: caption_files divides it by file-name hash), so
`run_all.py --captions OUT/captions.json --images OUT/images` runs the long-caption path on data that is long.
Scenes are drawn as the world's are (generate.make_scene), from generators seeded by (seed, PARAGRAPH_SPLIT, index).
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List

import numpy as np
from PIL import Image

from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import atomic_dir, write_json
from miniworld import world
from miniworld.generate import OBJECT_COUNT_PROBS, make_scene, rng_for

PARAGRAPH_SPLIT = 5  # the scenes' seed stream, apart from generate's P1, P2 and P3 splits
IMAGES = 300  # docs/results.md's paragraph world
JPEG_QUALITY = 95
MARKER = "captions.json"
COUNT_WORDS = {1: dict(count="one shape", be="is"), 2: dict(count="two shapes", be="are"),
               3: dict(count="three shapes", be="are")}
OPENINGS = ("The picture shows %(count)s on a gray background.", "There %(be)s %(count)s in this image.",
            "This image has %(count)s.")
SENTENCES = ("There is a %(size)s %(color)s %(shape)s %(place)s.", "A %(size)s %(color)s %(shape)s is %(place)s.",
             "%(Place)s there is a %(size)s %(color)s %(shape)s.", "The %(color)s %(shape)s is %(size)s and sits "
             "%(place)s.")


def object_sentence(rng: np.random.Generator, obj: world.Obj) -> str:
    """One sentence naming the object's size, colour, shape and place."""
    place = world.region_of(obj)
    words = dict(size=str(rng.choice(world.SIZE_WORDS[str(obj["size"])])), color=obj["color"], shape=obj["shape"],
                 place=place, Place=place[0].upper() + place[1:])
    return SENTENCES[int(rng.integers(len(SENTENCES)))] % words


def paragraph(rng: np.random.Generator, objects: List[world.Obj]) -> str:
    """The count of shapes, then one sentence per object from left to right."""
    opening = OPENINGS[int(rng.integers(len(OPENINGS)))] % COUNT_WORDS[len(objects)]
    ordered = sorted(objects, key=lambda o: float(o["cx"]))
    return " ".join([opening] + [object_sentence(rng, o) for o in ordered])


def write_paragraph_world(out: str, seed: int = 0, count: int = IMAGES) -> Dict[str, str]:
    """OUT/images/NNNNNN.jpg and OUT/captions.json, complete or not at all; returns the captions."""
    if count < 1:
        raise UserError("--images must be 1 or more, got %d" % count)
    captions = {}
    with atomic_dir(out, MARKER, "paragraph world") as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        for index in progress(range(count), desc="paragraph world", unit="img"):
            rng = rng_for(seed, PARAGRAPH_SPLIT, index)
            image, objects, _ = make_scene(rng, int(rng.choice([1, 2, 3], p=OBJECT_COUNT_PROBS)))
            name = "%06d.jpg" % (index + 1)
            Image.fromarray(image).save(os.path.join(tmp, "images", name), format="JPEG", quality=JPEG_QUALITY)
            captions[name] = paragraph(rng, objects)
        write_json(os.path.join(tmp, MARKER), captions)
    return captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (captions.json, images/); an earlier paragraph "
                        "world there is replaced")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--images", type=int, default=IMAGES, help="how many images (default %(default)s)")
    args = parser.parse_args()
    if args.seed < 0:
        raise UserError("--seed must be >= 0, got %d" % args.seed)
    captions = write_paragraph_world(args.out, args.seed, args.images)
    print("wrote %d paragraphs (seed %d) to %s" % (len(captions), args.seed, os.path.join(args.out, MARKER)))
    return 0


if __name__ == "__main__":
    run_main(main)
