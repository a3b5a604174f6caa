"""Prompt templates as data: `{}` marks the class name. "cifar" is the set CLIP's authors wrote for CIFAR-10/100 and
the one clip_benchmark used for open_clip's published CIFAR-100 zero-shot figures, hence our default."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple, Union

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


OPEN_CLIP_SETS = {"imagenet": "OPENAI_IMAGENET_TEMPLATES", "imagenet-simple": "SIMPLE_IMAGENET_TEMPLATES"}
Template = Union[str, Callable[[str], str]]  # "a photo of a {}." or open_clip's lambda c: f"a photo of a {c}."


def template_set(name: str) -> Sequence[Template]:
    """A named template set, or KeyError. The ImageNet sets are open_clip's own (its zero_shot_metadata), passed on
    as it keeps them: the classifier builders take strings and callables alike (fill_in)."""
    if name == "cifar":
        return CIFAR_TEMPLATES
    if name in SINGLE_TEMPLATES:
        return SINGLE_TEMPLATES[name]
    if name in OPEN_CLIP_SETS:
        try:
            import open_clip
        except ImportError:
            raise KeyError("%s (open_clip's template set; open_clip_torch is not installed)" % name) from None
        return tuple(getattr(open_clip, OPEN_CLIP_SETS[name]))
    raise KeyError(name)


def fill_in(template: Template, class_name: str) -> str:
    return template(class_name) if callable(template) else template.replace("{}", class_name)


def set_names() -> List[str]:
    return ["cifar"] + list(OPEN_CLIP_SETS) + list(SINGLE_TEMPLATES)
