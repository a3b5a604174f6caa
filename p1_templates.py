"""Prompt templates as data: `{}` marks the class name. "cifar" is the set CLIP's authors wrote for CIFAR-10/100 and
the one clip_benchmark used for open_clip's published CIFAR-100 zero-shot figures, hence our default."""
from __future__ import annotations

from typing import Dict, List, Tuple

CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

# The three single templates the homework report compares (its `{object}` written as `{}`).
REPORT_TEMPLATES = (
    ("photo", "This is a photo of {}"),
    ("not-photo", "This is not a photo of {}"),
    ("no-score", "No {}, no score."),
)

SINGLE_TEMPLATES: Dict[str, Tuple[str, ...]] = dict((name, (text,)) for name, text in REPORT_TEMPLATES)
SINGLE_TEMPLATES["single"] = ("a photo of a {}.",)


def _open_clip_imagenet(name: str) -> Tuple[str, ...]:
    """open_clip keeps the ImageNet sets as lambdas; calling them with "{}" turns them back into data."""
    import open_clip

    return tuple(template("{}") for template in getattr(open_clip, name))


def template_set(name: str) -> Tuple[str, ...]:
    """A named template set, or KeyError."""
    if name == "cifar":
        return CIFAR_TEMPLATES
    if name in SINGLE_TEMPLATES:
        return SINGLE_TEMPLATES[name]
    if name == "imagenet":
        return _open_clip_imagenet("OPENAI_IMAGENET_TEMPLATES")
    if name == "imagenet-simple":
        return _open_clip_imagenet("SIMPLE_IMAGENET_TEMPLATES")
    raise KeyError(name)


def set_names() -> List[str]:
    return ["cifar", "imagenet", "imagenet-simple"] + list(SINGLE_TEMPLATES)
