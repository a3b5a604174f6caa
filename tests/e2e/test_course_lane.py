"""The course lane really is the grader's environment, and the torch-1.12 fallbacks are the paths that run there.

`bash test.sh --lane course` sets HW3_LANE=course; in the modern lane these checks are skipped."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from hw3 import REPO_ROOT as ROOT

pytestmark = pytest.mark.skipif(os.environ.get("HW3_LANE") != "course", reason="course lane only (HW3_LANE=course)")


def pins() -> dict:
    with open(os.path.join(ROOT, "requirements-course.txt"), encoding="utf-8") as f:
        return dict(m.groups() for m in (re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line) for line in f) if m)


def installed(name: str) -> str:
    try:
        from importlib.metadata import version
    except ImportError:  # pragma: no cover - Python 3.8 has it
        from importlib_metadata import version
    return version(name)


def test_python_and_the_pinned_packages_are_the_courses():
    assert sys.version_info[:2] == (3, 8)
    wanted = pins()
    assert {"torch", "torchvision", "timm", "loralib"} <= set(wanted)
    for name, version in wanted.items():
        assert installed(name).split("+")[0] == version, name


def test_attention_takes_the_explicit_softmax_path():
    from hw3.models import gpt2

    assert not hasattr(torch.nn.functional, "scaled_dot_product_attention") and not gpt2.HAS_SDPA


def test_grad_scaler_is_the_torch_1_12_one():
    from hw3.training import optimiser

    assert not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler")
    assert isinstance(optimiser.grad_scaler(False), torch.cuda.amp.GradScaler)


def test_torch_load_has_no_weights_only():
    import inspect

    assert "weights_only" not in inspect.signature(torch.load).parameters
