"""Trains the tiny CLIP (open_clip's own architecture, miniworld/models/tiny_clip.json) contrastively from scratch.

The training scenes and captions never contain the held-out colour-shape pairs (world.HELDOUT), so zero-shot P1 on
those classes measures composition, not memory. Some captions name only the colour or only the shape: without them
the text tower learns ten unrelated "red X" codes instead of one "red". Token-embedding rows of tokens that no world
caption uses start at zero and stay zero (no gradient reaches them), so the saved file compresses well.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import atomic_write, write_json
from miniworld import world
from miniworld.cli import run_training, training_parser
from hw3.zeroshot.prompt_templates import CIFAR_TEMPLATES

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "models", "tiny_clip.json")
OUT = os.path.join(HERE, "models", "tiny_clip.pt")

# Settings: the defaults are the committed model's.
SEED = 0
STEPS = 2600
BATCH = 64
LR = 5e-4
WARMUP = 100
WEIGHT_DECAY = 0.05
POOL_SCENES = 10000           # pre-rendered training scenes, re-captioned every time they are drawn
SCENE_OBJECT_PROBS = (0.6, 0.2, 0.2)  # P(1, 2, 3 objects) in a training scene
PARTIAL_CAPTION_PROB = 0.3    # single-object captions naming only the colour or only the shape
HARD_BATCH_PROB = 0.5         # batches of single objects in two colours (see batch_indices)
EVAL_PER_CLASS = 10
EVAL_EVERY = 200

# P1's default ensemble (CIFAR templates) among the prompt-style captions, so zero-shot prompts are in-distribution.
PROMPTS = ["a {}", "a picture of a {}", "this is a photo of a {}", "This is a photo of {}", "an image of a {}",
           "a drawing of a {}", "a {} on a gray background", "there is a {}"] + list(CIFAR_TEMPLATES)
COLOR_ONLY = ["a {} shape", "something {}", "a {} object", "a photo of a {} shape", "the color {}"]
SHAPE_ONLY = ["a {}", "a photo of a {}", "a {} of some color", "a {} shape", "there is a {}"]


def normalise(images: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float normalised as open_clip's preprocess does (OpenAI mean and std)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def render_pool(seed: int, count: int, pairs: Sequence[Tuple[str, str]], single_only: bool = False,
                desc: str = "rendering scenes") -> Tuple[np.ndarray, List[List[dict]]]:
    """`count` scenes drawn only from `pairs`: (N, H, W, 3) uint8 images and their objects."""
    images = np.zeros((count, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    scenes = []
    for i in progress(range(count), desc=desc, unit="img", leave=False):
        rng = np.random.default_rng([seed, 7, i])
        n_objects = 1 if single_only else int(rng.choice([1, 2, 3], p=SCENE_OBJECT_PROBS))
        objects = world.sample_objects(rng, n_objects, pairs)
        images[i], _ = world.render(rng, objects)
        scenes.append(objects)
    return images, scenes


def training_caption(rng: np.random.Generator, objects: List[dict]) -> Tuple[str, str, object]:
    """One caption for a scene and what it pins down: ("full", frozenset of pairs), ("color", c) or ("shape", s).
    Prompt-style or world-style full captions; for one object sometimes only its colour or only its shape."""
    pairs = frozenset((o["color"], o["shape"]) for o in objects)
    if len(objects) == 1:
        obj = objects[0]
        roll = rng.random()
        if roll < PARTIAL_CAPTION_PROB / 2:
            return str(rng.choice(COLOR_ONLY)).format(obj["color"]), "color", obj["color"]
        if roll < PARTIAL_CAPTION_PROB:
            return str(rng.choice(SHAPE_ONLY)).format(obj["shape"]), "shape", obj["shape"]
        if roll < 0.75:
            return str(rng.choice(PROMPTS)).format("%s %s" % (obj["color"], obj["shape"])), "full", pairs
    return world.scene_captions(rng, objects, 1)[0], "full", pairs


def matches(kind: str, value: object, objects: List[dict]) -> bool:
    """Whether a caption of this kind and value is true of a scene: in-batch duplicates are positives, not negatives."""
    if kind == "full":
        return value == frozenset((o["color"], o["shape"]) for o in objects)
    return len(objects) == 1 and objects[0][kind] == value


def batch_indices(rng: np.random.Generator, scenes: List[List[dict]], by_color: Dict[str, np.ndarray], batch: int):
    """Half the batches hold single objects of only two colours, so that telling shapes apart is what lowers the loss
    (in a random batch, colour alone separates most pairs and shape is learnt slowly)."""
    if rng.random() < HARD_BATCH_PROB:
        colors = rng.choice(list(by_color), size=2, replace=False)
        pool = np.concatenate([by_color[c] for c in colors])
        return rng.choice(pool, size=batch, replace=len(pool) < batch)
    return rng.choice(len(scenes), size=batch, replace=False)


def used_tokens(tokenizer, seed: int, pairs: Sequence[Tuple[str, str]]) -> torch.Tensor:
    """Ids of every token a training caption can contain (found by tokenising many sampled captions)."""
    rng = np.random.default_rng([seed, 11])
    texts = [p.format(w) for p in PROMPTS + COLOR_ONLY + SHAPE_ONLY for w in world.class_names() + list(world.COLOR_NAMES)
             + list(world.SHAPES)]
    for _ in range(4000):
        n = int(rng.integers(1, 4))
        texts.append(training_caption(rng, world.sample_objects(rng, n, pairs))[0])
    return torch.unique(tokenizer(texts))


@torch.no_grad()
def class_embeddings(model, tokenizer, names: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
    """(C, D) zero-shot classifier: prompt embeddings normalised, averaged over prompts, normalised again."""
    weights = []
    for name in names:
        emb = F.normalize(model.encode_text(tokenizer([p.format(name) for p in prompts])), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot(model, tokenizer, images: np.ndarray, labels: np.ndarray, prompts: Sequence[str]) -> Dict[str, float]:
    """P1 accuracy over all 50 classes, held-out images among the held-out classes, and held-out among all 50."""
    model.eval()
    names = world.class_names()
    classifier = class_embeddings(model, tokenizer, names, prompts)
    feats = torch.cat([F.normalize(model.encode_image(normalise(images[i:i + 256])), dim=-1)
                       for i in range(0, len(images), 256)])
    scores = feats @ classifier.t()  # (N, 50)
    heldout = torch.tensor(world.heldout_labels())
    labels_t = torch.from_numpy(labels)
    is_heldout = torch.isin(labels_t, heldout)
    among_heldout = heldout[scores[is_heldout][:, heldout].argmax(1)]
    return dict(p1_accuracy=float((scores.argmax(1) == labels_t).float().mean()),
                p1_heldout_accuracy=float((among_heldout == labels_t[is_heldout]).float().mean()),
                p1_heldout_accuracy_all_classes=float((scores[is_heldout].argmax(1) == labels_t[is_heldout]).float().mean()))


def eval_set(seed: int, per_class: int) -> Tuple[np.ndarray, np.ndarray]:
    """Single-object images of all 50 classes (held-out ones included), from a stream the training never draws."""
    names = world.class_names()
    images, labels = [], []
    for label, name in enumerate(names):
        color, shape = name.split(" ")
        pool, _ = render_pool(seed * 1000 + 500 + label, per_class, [(color, shape)], single_only=True, desc=name)
        images.append(pool)
        labels += [label] * per_class
    return np.concatenate(images), np.asarray(labels)


def build_model(config: str, seed: int):
    import open_clip

    torch.manual_seed(seed)
    open_clip.add_model_config(config)
    name = os.path.splitext(os.path.basename(config))[0]
    model = open_clip.create_model(name)
    return model, open_clip.get_tokenizer(name)


def save(model, out: str) -> None:
    """fp16 state dict that open_clip loads into its fp32 model; written at every evaluation, so a stopped run
    leaves its latest model."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with atomic_write(out, "wb") as f:
        torch.save(state, f)


def train(config: str, out: str, seed: int, steps: int, batch: int) -> Dict[str, float]:
    model, tokenizer = build_model(config, seed)
    pairs = [(c, s) for c in world.COLOR_NAMES for s in world.SHAPES if (c, s) not in world.HELDOUT]
    with torch.no_grad():
        keep = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
        keep[used_tokens(tokenizer, seed, pairs)] = True
        model.token_embedding.weight[~keep] = 0.0
    images, scenes = render_pool(seed, POOL_SCENES, pairs)
    singles = np.asarray([i for i, objs in enumerate(scenes) if len(objs) == 1])
    by_color = {c: singles[[scenes[i][0]["color"] == c for i in singles]] for c in world.COLOR_NAMES}
    eval_images, eval_labels = eval_set(seed, EVAL_PER_CLASS)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)],
                                  lr=LR, betas=(0.9, 0.98), eps=1e-6)
    schedule = lambda step: min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng([seed, 13])
    log = []
    bar = progress(range(steps), desc="tiny CLIP", unit="step")
    for step in bar:
        model.train()
        idx = batch_indices(rng, scenes, by_color, batch)
        captions = [training_caption(rng, scenes[i]) for i in idx]
        image_feats, text_feats, logit_scale = model(normalise(images[idx]), tokenizer([c[0] for c in captions]))[:3]
        logits = logit_scale * image_feats @ text_feats.t()  # (B images, B captions)
        positive = torch.tensor([[matches(kind, value, scenes[i]) for _, kind, value in captions] for i in idx])
        assert bool(positive.diagonal().all())
        target = positive.float()  # several true captions per image (and images per caption) share the target mass
        loss = (F.cross_entropy(logits, target / target.sum(1, keepdim=True))
                + F.cross_entropy(logits.t(), target.t() / target.t().sum(1, keepdim=True))) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss="%.3f" % loss.item())
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            scores = zero_shot(model, tokenizer, eval_images, eval_labels, ["a photo of a {}."])
            log.append(dict(step=step + 1, loss=round(loss.item(), 4), **{k: round(v, 4) for k, v in scores.items()}))
            print(log[-1], file=sys.stderr)
            save(model, out)
    assert bool((model.token_embedding.weight[~keep] == 0).all()), "unused token rows left zero"
    save(model, out)
    final = dict(log[-1], ensemble=zero_shot(model, tokenizer, eval_images, eval_labels, PROMPTS))
    write_json(os.path.splitext(out)[0] + ".log.json", dict(seed=seed, steps=steps, batch=batch, log=log, final=final))
    return final


def main() -> int:
    parser = training_parser(__doc__, OUT, "state-dict file to write (fp16)", SEED, "seed of the model, scenes and "
                             "captions", STEPS, BATCH, "contrastive batch size")
    parser.add_argument("--config", default=CONFIG, help="open_clip model-config JSON (default: the tiny CLIP's)")
    args = parser.parse_args()
    if not os.path.isfile(args.config):
        raise UserError("--config not found: %s" % args.config)
    return run_training(args, "tiny CLIP", lambda: train(args.config, args.out, args.seed, args.steps, args.batch),
                        min_batch=2)


if __name__ == "__main__":
    run_main(main)
