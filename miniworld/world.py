"""The miniature world: scenes of 1-3 coloured shapes, their captions, and object F1 of a caption against a scene.

Everything is a pure function of a numpy Generator, so a seed fixes every pixel, box and caption. The 50 classes
are COLORS x SHAPES; HELDOUT lists the 10 colour-shape pairs the tiny CLIP never sees, chosen so that neither the
colour nor the shape alone tells them apart (each held-out colour comes with two held-out shapes and vice versa).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}
COLORS = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (230, 205, 20), "green": (40, 150, 50),
    "cyan": (30, 195, 205), "blue": (35, 70, 210), "purple": (125, 45, 170), "pink": (240, 120, 190),
    "brown": (120, 75, 35), "black": (25, 25, 25),
}
COLOR_NAMES = tuple(COLORS)
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
SIZE_RANGE = {"small": (0.28, 0.36), "large": (0.44, 0.56)}  # object side as a fraction of the image side
IMAGE_SIZE = 96
BACKGROUND = 232  # light grey; objects are saturated or dark, so none vanishes into it
NOISE_STD = 7.0
COLOR_JITTER = 14
SUPERSAMPLE = 4
HELDOUT = tuple((COLOR_NAMES[k], SHAPES[(k + j) % len(SHAPES)]) for k in range(5) for j in range(2))

Obj = Dict[str, object]


def class_names() -> List[str]:
    """The 50 P1 class names in label order: label = color_index * len(SHAPES) + shape_index."""
    return ["%s %s" % (c, s) for c in COLOR_NAMES for s in SHAPES]


def label_of(color: str, shape: str) -> int:
    return COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


def heldout_labels() -> List[int]:
    return sorted(label_of(c, s) for c, s in HELDOUT)


def shape_polygon(shape: str, cx: float, cy: float, side: float, angle: float) -> List[Tuple[float, float]]:
    """Outline of a shape of the given side (diameter) centred at (cx, cy), rotated by `angle` radians."""
    r = side / 2.0
    if shape == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        pts = [(r * np.cos(a), r * np.sin(a)) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]
        pts = [(x, y + r * 0.2) for x, y in pts]  # centre the triangle's bounding box
    elif shape == "star":
        pts = [((r if i % 2 == 0 else 0.45 * r) * np.cos(-np.pi / 2 + i * np.pi / 5),
                (r if i % 2 == 0 else 0.45 * r) * np.sin(-np.pi / 2 + i * np.pi / 5)) for i in range(10)]
    elif shape == "cross":
        t = 0.36 * r
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
    else:
        raise ValueError("unknown shape %r (known: %s)" % (shape, ", ".join(SHAPES)))
    cos, sin = np.cos(angle), np.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts]


def object_alpha(obj: Obj, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object on a size x size canvas, drawn at SUPERSAMPLE x resolution."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, side = (float(obj[k]) * SUPERSAMPLE for k in ("cx", "cy", "side"))
    if obj["shape"] == "circle":
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=255)
    else:
        draw.polygon(shape_polygon(str(obj["shape"]), cx, cy, side, float(obj["angle"])), fill=255)
    small = big.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def sample_objects(rng: np.random.Generator, n_objects: int, pairs: Sequence[Tuple[str, str]],
                   size: int = IMAGE_SIZE) -> List[Obj]:
    """1-3 objects with distinct colour-shape pairs from `pairs`, placed so their boxes keep a gap between them
    (three objects are all small so that they fit; a scene that does not fit is laid out again)."""
    chosen = [pairs[int(i)] for i in rng.choice(len(pairs), size=n_objects, replace=False)]
    for _ in range(100):
        objects: List[Obj] = []
        for color, shape in chosen:
            for _ in range(50):
                size_name = "small" if n_objects == 3 else str(rng.choice(["small", "large"]))
                low, high = SIZE_RANGE[size_name]
                side = float(rng.uniform(low, high)) * size
                margin = side / 2 + 2
                cx, cy = (float(v) for v in rng.uniform(margin, size - margin, size=2))
                if all(max(abs(cx - o["cx"]), abs(cy - o["cy"])) > (side + float(o["side"])) / 2 + 3 for o in objects):
                    break
            else:
                break
            angle = 0.0 if shape == "circle" else float(rng.uniform(-0.3, 0.3))
            jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
            rgb = [int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter)]
            objects.append(dict(color=color, shape=shape, size=size_name, cx=cx, cy=cy, side=side, angle=angle, rgb=rgb))
        if len(objects) == n_objects:
            return objects
    raise RuntimeError("could not place %d objects without overlap" % n_objects)


def render(rng: np.random.Generator, objects: List[Obj], size: int = IMAGE_SIZE) -> Tuple[np.ndarray, List[np.ndarray]]:
    """(H, W, 3) uint8 image on a noisy light background, and one boolean mask per object (its visible pixels)."""
    canvas = BACKGROUND + rng.normal(0.0, NOISE_STD, size=(size, size, 1)) + rng.normal(0.0, 3.0, size=(1, 1, 3))  # (H, W, 3)
    masks = []
    for obj in objects:
        alpha = object_alpha(obj, size)[:, :, None]  # (H, W, 1)
        canvas = canvas * (1 - alpha) + np.asarray(obj["rgb"], dtype=np.float64) * alpha
        masks.append(alpha[:, :, 0] >= 0.5)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), masks


def box_of(mask: np.ndarray) -> List[int]:
    """COCO box [x, y, width, height] in pixels enclosing every pixel of the mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


# --- captions -------------------------------------------------------------------------------------------------


def region_of(obj: Obj, size: int = IMAGE_SIZE) -> str:
    """Where an object sits in a 3 x 3 grid: 'in the top left', 'on the right', 'in the center'..."""
    rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
    row, col = (min(int(float(obj[k]) / size * 3), 2) for k in ("cy", "cx"))
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return "on the " + cols[col]
    if col == 1:
        return "at the " + rows[row]
    return "in the %s %s" % (rows[row], cols[col])


def phrase(rng: np.random.Generator, obj: Obj, size_word: Optional[bool] = None) -> str:
    """'a red circle' or 'a small red circle'."""
    if size_word is None:
        size_word = bool(rng.random() < 0.4)
    words = [str(rng.choice(SIZE_WORDS[str(obj["size"])]))] if size_word else []
    words += [str(obj["color"]), str(obj["shape"])]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def scene_captions(rng: np.random.Generator, objects: List[Obj], count: int = 5) -> List[str]:
    """`count` distinct captions from varied templates; every one names every object by colour and shape."""
    objs = sorted(objects, key=lambda o: float(o["cx"]))  # left to right

    def p(i: int, size_word: Optional[bool] = None) -> str:
        return phrase(rng, objs[i], size_word)
    if len(objs) == 1:
        templates = [
            lambda: p(0), lambda: p(0, True), lambda: p(0) + " on a gray background",
            lambda: "%s %s" % (p(0), region_of(objs[0])), lambda: "there is %s %s" % (p(0), region_of(objs[0])),
            lambda: "a picture of " + p(0), lambda: "a single %s %s" % (objs[0]["color"], objs[0]["shape"]),
            lambda: "%s on its own" % p(0, True),
        ]
    elif len(objs) == 2:
        a, b = objs
        vertical = abs(float(a["cy"]) - float(b["cy"])) > abs(float(a["cx"]) - float(b["cx"]))
        top, bottom = (0, 1) if float(a["cy"]) < float(b["cy"]) else (1, 0)
        templates = [
            lambda: "%s and %s" % (p(0), p(1)), lambda: "two shapes: %s and %s" % (p(0), p(1)),
            lambda: "%s next to %s" % (p(1), p(0)), lambda: "%s and %s on a gray background" % (p(1), p(0)),
        ]
        if vertical:
            templates += [lambda: "%s above %s" % (p(top), p(bottom)), lambda: "%s below %s" % (p(bottom), p(top))]
        else:
            templates += [lambda: "%s to the left of %s" % (p(0), p(1)), lambda: "%s to the right of %s" % (p(1), p(0))]
    else:
        templates = [
            lambda: "%s, %s and %s" % (p(0), p(1), p(2)),
            lambda: "three shapes: %s, %s and %s" % (p(0), p(1), p(2)),
            lambda: "from left to right: %s, %s and %s" % (p(0), p(1), p(2)),
            lambda: "%s between %s and %s" % (p(1), p(0), p(2)),
            lambda: "%s to the left of %s and %s" % (p(0), p(1), p(2)),
            lambda: "%s, %s and %s on a gray background" % (p(2), p(0), p(1)),
        ]
    captions: List[str] = []
    for _ in range(count * 20):
        caption = templates[int(rng.integers(len(templates)))]()
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    return captions


# --- object F1 ------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_SKIPPABLE = {w for words in SIZE_WORDS.values() for w in words} | {"tiny", "huge", "single"}


def parse_objects(caption: str) -> List[Tuple[Optional[str], str]]:
    """(colour or None, shape) for every shape the caption names; 'two red stars' gives the pair twice."""
    words = _WORD.findall(caption.lower())
    found: List[Tuple[Optional[str], str]] = []
    for i, word in enumerate(words):
        shape = word if word in SHAPES else SHAPE_PLURALS.get(word)
        if shape is None:
            continue
        color, count, j = None, 1, i - 1
        while j >= 0 and (words[j] in _SKIPPABLE or (color is None and words[j] in COLORS)):
            if words[j] in COLORS:
                color = words[j]
            j -= 1
        if j >= 0 and words[j] in _COUNTS and word in SHAPE_PLURALS:
            count = _COUNTS[words[j]]
        found.extend([(color, shape)] * count)
    return found


def scenes_of(val_objects: dict) -> Dict[str, List[Tuple[str, str]]]:
    """{image key (file name without extension): [(colour, shape), ...]} of a split's val_objects.json contents."""
    return {os.path.splitext(v["file_name"])[0]: [(o["color"], o["shape"]) for o in v["objects"]]
            for v in val_objects.values()}


def object_scores(predictions: Dict[str, str], scenes: Dict[str, Iterable[Tuple[str, str]]]) -> Dict[str, float]:
    """Micro-averaged precision/recall/F1 of colour-shape pairs named in each caption against the scene's objects,
    and the rate of captions naming exactly the scene's set; a scene without a caption counts as naming nothing."""
    tp = n_pred = n_true = exact = 0
    for key, truth in scenes.items():
        true_counts = Counter(tuple(t) for t in truth)
        pred_counts = Counter(parse_objects(predictions.get(key, "")))
        tp += sum((true_counts & pred_counts).values())
        n_pred += sum(pred_counts.values())
        n_true += sum(true_counts.values())
        exact += int(true_counts == pred_counts)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(object_precision=precision, object_recall=recall, object_f1=f1,
                exact_object_set=exact / len(scenes) if scenes else 0.0, images=len(scenes))
