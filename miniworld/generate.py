"""Writes the miniature world's P1, P2 and P3 splits, shaped like the homework's data, from one seed.

Every image draws from its own generator seeded by (seed, split, index), so a split is the same whatever the sizes of
the others, and --small is a prefix of the full world. The output appears complete or not at all: it is written to a
temporary sibling folder and renamed into place.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image


from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import atomic_dir, atomic_write, write_json
from miniworld import world

SPLIT_P1, SPLIT_P2_TRAIN, SPLIT_P2_VAL, SPLIT_P3 = 1, 2, 3, 4
OBJECT_COUNT_PROBS = (0.3, 0.4, 0.3)  # P(1, 2, 3 objects) in P2/P3 scenes
VAL_ID_OFFSET = 900000
MARKER = "world.json"
# Top-level folders of each part: the world's own names, or the course's (hw3_data: p1_data, p2_data, p3_data, with
# the decoder weights in p2_data as the course ships them). The world's extra files (objects, held-out classes) sit
# beside the course's files either way.
LAYOUTS = dict(world=dict(p1="p1", p1_heldout="p1_heldout", p2="p2", p3="p3"),
               course=dict(p1="p1_data", p1_heldout="p1_heldout_data", p2="p2_data", p3="p3_data"))
COURSE_DECODER = "decoder_model.bin"  # p2_data/decoder_model.bin
FULL = dict(p1_per_class=20, p2_train=3000, p2_val=250, p3=5, captions=5)
SMALL = dict(p1_per_class=2, p2_train=40, p2_val=12, p3=3, captions=5)


def rng_for(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def object_record(obj: dict, mask: np.ndarray) -> dict:
    """An object as the JSON files keep it: colour, shape, size word, COCO box and RLE mask."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(color=obj["color"], shape=obj["shape"], size=obj["size"], bbox=world.box_of(mask),
                segmentation=dict(size=[int(v) for v in rle["size"]], counts=str(rle["counts"], "ascii")))


def make_scene(rng: np.random.Generator, n_objects: int) -> Tuple[np.ndarray, List[dict], List[dict]]:
    pairs = [(c, s) for c in world.COLOR_NAMES for s in world.SHAPES]
    objects = world.sample_objects(rng, n_objects, pairs)
    image, masks = world.render(rng, objects)
    return image, objects, [object_record(o, m) for o, m in zip(objects, masks)]


PNG_LEVEL = 1  # zlib's fastest: 2.4x faster than PIL's default 6 on the world's flat-coloured images, and smaller


def save_png(path: str, image: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG", compress_level=PNG_LEVEL)


def write_p1(out: str, seed: int, per_class: int, folders: dict = LAYOUTS["world"]) -> None:
    """p1/val/{label}_{id}.png with one object each, id2label.json, the held-out classes and their own split."""
    names = world.class_names()
    jobs = [(label, k) for label in range(len(names)) for k in range(per_class)]
    objects = {}
    for label, k in progress(jobs, desc="p1 images", unit="img"):
        color, shape = names[label].split(" ")
        rng = rng_for(seed, SPLIT_P1, label * 100000 + k)
        objs = world.sample_objects(rng, 1, [(color, shape)])
        image, masks = world.render(rng, objs)
        file_name = "%d_%d.png" % (label, k)
        save_png(os.path.join(out, folders["p1"], "val", file_name), image)
        objects[file_name] = [object_record(objs[0], masks[0])]
    write_json(os.path.join(out, folders["p1"], "id2label.json"), {str(i): n for i, n in enumerate(names)})
    heldout = world.heldout_labels()
    write_json(os.path.join(out, folders["p1"], "heldout.json"),
               dict(labels=heldout, names=[names[i] for i in heldout],
                    note="colour-shape pairs that never occur in the tiny CLIP's training images or captions"))
    write_json(os.path.join(out, folders["p1"], "val_objects.json"), objects, indent=None)
    write_p1_heldout(out, heldout, names, folders)


def write_p1_heldout(out: str, heldout: List[int], names: List[str], folders: dict = LAYOUTS["world"]) -> None:
    """p1_heldout/: the held-out classes' images as a P1 split of their own (labels 0..9), so the P1 CLI measures
    zero-shot accuracy among the held-out classes directly."""
    source = os.path.join(out, folders["p1"], "val")
    for name in sorted(os.listdir(source)):
        label, image_id = name.split("_", 1)
        if int(label) in heldout:
            shutil.copyfile(os.path.join(source, name),
                            os.path.join(_makedirs(out, folders["p1_heldout"], "val"), "%d_%s" % (heldout.index(int(label)), image_id)))
    write_json(os.path.join(out, folders["p1_heldout"], "id2label.json"), {str(i): names[label] for i, label in enumerate(heldout)})


def _makedirs(*parts: str) -> str:
    path = os.path.join(*parts)
    os.makedirs(path, exist_ok=True)
    return path


def write_p2_split(out: str, seed: int, split: str, count: int, captions: int,
                   folders: dict = LAYOUTS["world"]) -> Dict[str, dict]:
    """p2/images/{split}/*.png and the course's COCO-style {split}.json; returns the scenes' objects by file stem."""
    split_code, id_offset = (SPLIT_P2_TRAIN, 0) if split == "train" else (SPLIT_P2_VAL, VAL_ID_OFFSET)
    images, annotations, scenes = [], [], {}
    for index in progress(range(count), desc="p2 %s images" % split, unit="img"):
        rng = rng_for(seed, split_code, index)
        n_objects = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_PROBS))
        image, objs, records = make_scene(rng, n_objects)
        image_id = id_offset + index + 1
        file_name = "%06d.png" % image_id
        save_png(os.path.join(out, folders["p2"], "images", split, file_name), image)
        images.append(dict(file_name=file_name, id=image_id))
        for caption in world.scene_captions(rng, objs, captions):
            annotations.append(dict(caption=caption, id=len(annotations) + 1 + id_offset * 10, image_id=image_id))
        scenes[os.path.splitext(file_name)[0]] = dict(file_name=file_name, id=image_id, objects=records)
    write_json(os.path.join(out, folders["p2"], "%s.json" % split),
               dict(info="miniworld-%s seed %d" % (split, seed), licenses="", annotations=annotations, images=images))
    return scenes


def write_p3(out: str, seed: int, count: int, folders: dict = LAYOUTS["world"]) -> None:
    """A few P3-style images named after their content, with their objects (boxes and masks) beside them."""
    scenes = {}
    for index in range(count):
        rng = rng_for(seed, SPLIT_P3, index)
        image, objs, records = make_scene(rng, 1 + index % 3)
        stem = "_".join("%s-%s" % (o["color"], o["shape"]) for o in sorted(objs, key=lambda o: float(o["cx"])))
        save_png(os.path.join(out, folders["p3"], "images", stem + ".png"), image)
        scenes[stem] = dict(file_name=stem + ".png", objects=records)
    write_json(os.path.join(out, folders["p3"], "objects.json"), scenes)


def generate(out: str, seed: int, small: bool, layout: str = "world", decoder: Optional[str] = None) -> dict:
    """Builds the whole world in a temporary sibling folder, then renames it to `out` (which must be absent, empty or
    an earlier world). layout="course" lays it out as the course's hw3_data (p1_data, p2_data, p3_data) and copies
    `decoder` (the tiny GPT-2) to p2_data/decoder_model.bin, so run_all.py --data reads it as it reads hw3_data."""
    if layout not in LAYOUTS:
        raise UserError("layout must be one of %s, got %r" % (", ".join(LAYOUTS), layout))
    if layout == "course" and not (decoder and os.path.isfile(decoder)):
        raise UserError("the course layout needs the decoder weights for p2_data/%s; not found: %s"
                        % (COURSE_DECODER, decoder))
    folders = LAYOUTS[layout]
    sizes = SMALL if small else FULL
    with atomic_dir(out, MARKER, "miniworld") as tmp:
        write_p1(tmp, seed, sizes["p1_per_class"], folders)
        write_p2_split(tmp, seed, "train", sizes["p2_train"], sizes["captions"], folders)
        val_scenes = write_p2_split(tmp, seed, "val", sizes["p2_val"], sizes["captions"], folders)
        write_json(os.path.join(tmp, folders["p2"], "val_objects.json"), val_scenes)
        write_p3(tmp, seed, sizes["p3"], folders)
        if layout == "course":
            shutil.copyfile(decoder, os.path.join(tmp, folders["p2"], COURSE_DECODER))
        summary = dict(seed=seed, small=small, layout=layout, folders=folders, image_size=world.IMAGE_SIZE,
                       sizes=sizes, heldout=[" ".join(p) for p in world.HELDOUT],
                       box_format="COCO [x, y, width, height] in pixels", mask_format="COCO RLE (pycocotools)")
        write_json(os.path.join(tmp, MARKER), summary)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--out", required=True, help="output folder; an existing world there is replaced")
    parser.add_argument("--small", action="store_true", help="a reduced world for tests (a few seconds)")
    parser.add_argument("--course-layout", action="store_true", help="lay the world out as the course's hw3_data "
                        "(p1_data, p2_data with decoder_model.bin, p3_data), for run_all.py --data")
    parser.add_argument("--decoder-weights", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models",
                                                                  COURSE_DECODER),
                        help="with --course-layout: the GPT-2 copied to p2_data/%s (default: the tiny one)"
                        % COURSE_DECODER)
    args = parser.parse_args()
    if args.seed < 0:
        raise UserError("--seed must be >= 0, got %d" % args.seed)
    summary = generate(args.out, args.seed, args.small, "course" if args.course_layout else "world",
                       args.decoder_weights)
    print("wrote miniworld (seed %d, %s) to %s" % (args.seed, "small" if args.small else "full", args.out))
    return 0 if summary else 1


if __name__ == "__main__":
    run_main(main)
