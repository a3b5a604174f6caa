"""Trains the miniature world's captioning encoder: a tiny timm ViT (a shrunken vit_base_patch16_clip_224, loaded
through the same `timm:NAME.TAG@FILE?k=v` path as a real tower), the tiny CLIP's image tower fine-tuned densely.

It starts from the tiny CLIP's visual tower (miniworld/models/tiny_clip.pt, converted by timm's own open_clip
checkpoint filter), as a real captioner starts from a CLIP tower. Contrastive training on whole-image captions leaves
the patch tokens poor at saying which shape lies where, and captioners trained on the bare tower named the wrong shape
in most scenes. So every patch token is then trained to tell the colour, shape, size and 3x3 region of the object
covering it (or background), and the class token which colour-shape pairs the scene holds; the heads are thrown away
and only the ViT is saved, in timm's own state-dict format. (Trained from scratch the same way, the tower had learnt
shape on only half the object patches after 750 steps.)

Scenes come from their own stream of seeds (never the P2 or P1 splits' images) and are rendered fresh every step.

    python3 -m miniworld.train_vit [--steps 1500] [--threads 2]
"""
from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hw3.util import safe_load
from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import atomic_write, write_json
from miniworld import world
from miniworld.cli import run_training, training_parser

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

NAME = "vit_base_patch16_clip_224.laion2b"  # CLIP-style ViT (pre-norm, OpenAI mean/std, no crop at test time)
ARCH = dict(img_size=96, patch_size=12, embed_dim=128, depth=4, num_heads=2)  # the tiny CLIP's image tower
OUT = os.path.join(HERE, "models", "caption_vit.pt")
INIT = os.path.join(HERE, "models", "tiny_clip.pt")


def spec(path: str = os.path.relpath(OUT, ROOT)) -> str:
    """The encoder spec captioners are trained and loaded with."""
    return "timm:%s@%s?%s" % (NAME, path, "&".join("%s=%s" % kv for kv in ARCH.items()))


SEED = 0
STEPS = 1500
BATCH = 64
LR = 5e-4
WARMUP = 100
WEIGHT_DECAY = 0.05
SPLIT_ENCODER = 6  # seed stream of this script's scenes (generate.py uses 1-4, train_clip.py 7)
OBJECT_COUNT_PROBS = (0.3, 0.4, 0.3)
MIN_COVERAGE = 0.2  # a patch belongs to the object covering most of it, if that object covers this much of it
EVAL_SCENES = 300
EVAL_EVERY = 100
REGIONS = [(r, c) for r in range(3) for c in range(3)]


def scene(seed: int, index: int) -> Tuple[np.ndarray, List[dict], List[np.ndarray]]:
    rng = np.random.default_rng([seed, SPLIT_ENCODER, index])
    n_objects = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_PROBS))
    pairs = [(c, s) for c in world.COLOR_NAMES for s in world.SHAPES]
    objects = world.sample_objects(rng, n_objects, pairs)
    image, _ = world.render(rng, objects)
    return image, objects, [world.object_alpha(o, world.IMAGE_SIZE) for o in objects]


def patch_targets(objects: List[dict], alphas: List[np.ndarray], grid: int) -> Dict[str, np.ndarray]:
    """Per patch (grid*grid,): colour, shape, size and region class of the object covering it, 0 = background."""
    size = world.IMAGE_SIZE
    cell = size // grid
    coverage = np.stack([a[:grid * cell, :grid * cell].reshape(grid, cell, grid, cell).mean((1, 3)).reshape(-1)
                         for a in alphas])  # (n_objects, grid*grid)
    owner = coverage.argmax(0)
    on = coverage.max(0) >= MIN_COVERAGE
    out = {}
    for key, classes in (("color", world.COLOR_NAMES), ("shape", world.SHAPES), ("size", ("small", "large"))):
        values = np.asarray([classes.index(o[key]) + 1 for o in objects])
        out[key] = np.where(on, values[owner], 0)
    regions = np.asarray([REGIONS.index(tuple(min(int(float(o[k]) / size * 3), 2) for k in ("cy", "cx"))) + 1
                          for o in objects])
    out["region"] = np.where(on, regions[owner], 0)
    return out


def scene_targets(objects: List[dict]) -> np.ndarray:
    present = np.zeros(len(world.class_names()), dtype=np.float32)
    for o in objects:
        present[world.label_of(str(o["color"]), str(o["shape"]))] = 1.0
    return present


class Heads(nn.Module):
    """Linear read-outs used only while training the encoder."""

    def __init__(self, width: int):
        super().__init__()
        self.patch = nn.ModuleDict(dict(color=nn.Linear(width, len(world.COLOR_NAMES) + 1),
                                        shape=nn.Linear(width, len(world.SHAPES) + 1),
                                        size=nn.Linear(width, 3), region=nn.Linear(width, len(REGIONS) + 1)))
        self.scene = nn.Linear(width, len(world.class_names()))


def batch(seed: int, indices, grid: int, normalise):
    images, patch, present = [], {k: [] for k in ("color", "shape", "size", "region")}, []
    for i in indices:
        image, objects, alphas = scene(seed, int(i))
        images.append(image)
        for key, value in patch_targets(objects, alphas, grid).items():
            patch[key].append(value)
        present.append(scene_targets(objects))
    return (normalise(np.stack(images)), {k: torch.from_numpy(np.stack(v)).long() for k, v in patch.items()},
            torch.from_numpy(np.stack(present)))


def losses(model, heads: Heads, images, patch, present) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    tokens = model.forward_features(images)  # (B, 1 + grid*grid, width), final norm applied
    cls, patches = tokens[:, 0], tokens[:, model.num_prefix_tokens:]
    terms, correct = {}, {}
    on_object = patch["shape"] > 0
    for key, head in heads.patch.items():
        logits = head(patches)  # (B, P, classes)
        terms[key] = F.cross_entropy(logits.flatten(0, 1), patch[key].flatten())
        correct[key] = (logits.argmax(-1) == patch[key])[on_object].float().mean()
    scene_logits = heads.scene(cls)
    terms["scene"] = F.binary_cross_entropy_with_logits(scene_logits, present) * 10
    correct["scene"] = ((scene_logits > 0).float() == present).all(1).float().mean()
    return sum(terms.values()), correct


def initial_model(init: str):
    """The timm tower, from an open_clip CLIP state dict (timm converts it) or random ("none")."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(NAME.split(".")[0], pretrained=False, num_classes=0, **ARCH)
    if init != "none":
        if not os.path.isfile(init):
            raise UserError("--init %s not found: run `python3 -m miniworld.train_clip` first" % init)
        state = {k: v.float() for k, v in safe_load.load_tensors(init, "--init CLIP weights").items()}
        converted = {k: v for k, v in checkpoint_filter_fn(state, model).items() if not k.startswith("head.")}
        model.load_state_dict(converted)
    return model


def train(out: str, seed: int, steps: int, batch_size: int, init: str = INIT) -> dict:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    torch.manual_seed(seed)
    model = initial_model(init)
    heads = Heads(model.num_features)
    grid = ARCH["img_size"] // ARCH["patch_size"]
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    normalise = lambda x: (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW([dict(params=[p for p in params if p.ndim >= 2], weight_decay=WEIGHT_DECAY),
                                   dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)], lr=LR)
    schedule = lambda step: min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    eval_batch = batch(seed + 1000, range(EVAL_SCENES), grid, normalise)  # another seed: scenes training never draws
    log = []
    bar = progress(range(steps), desc="tiny ViT", unit="step")
    for step in bar:
        model.train()
        images, patch, present = batch(seed, range(step * batch_size, (step + 1) * batch_size), grid, normalise)
        loss, _ = losses(model, heads, images, patch, present)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        bar.set_postfix(loss="%.3f" % loss.item())
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                _, correct = losses(model, heads, *eval_batch)
            log.append(dict(step=step + 1, loss=round(loss.item(), 4),
                            **{"%s_accuracy" % k: round(float(v), 4) for k, v in correct.items()}))
            print(log[-1], file=sys.stderr)
            save(model, out)
    write_json(os.path.splitext(out)[0] + ".log.json", dict(
        seed=seed, steps=steps, batch=batch_size, init=os.path.relpath(init, ROOT) if init != "none" else init, model=NAME, arch=ARCH, spec=spec(), log=log,
        note="accuracies on %d held-out scenes: per patch on object patches (colour, shape, size, region) and "
             "the exact set of colour-shape pairs per scene" % EVAL_SCENES))
    return log[-1]


def save(model, out: str) -> None:
    """fp16 timm state dict (timm casts it to the model's fp32 when loading)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with atomic_write(out, "wb") as f:
        torch.save(state, f)


def main() -> int:
    parser = training_parser(__doc__, OUT, "state-dict file to write", SEED, "seed of the heads and scenes", STEPS,
                             BATCH, "scenes per step")
    parser.add_argument("--init", default=INIT, help="open_clip CLIP state dict to start from, or none "
                        "(default: the tiny CLIP, %(default)s)")
    args = parser.parse_args()
    return run_training(args, "tiny ViT", lambda: train(args.out, args.seed, args.steps, args.batch, args.init))


if __name__ == "__main__":
    run_main(main)
