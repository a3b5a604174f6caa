"""Tests import the hw3 package from the repository root, never reach a model hub, and use one thread."""
from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models run 5-20x faster on one thread than on two contended ones; subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))  # tiny_models.py


@pytest.fixture(scope="module")
def captioning_world(tmp_path_factory):
    """A tiny captioner with trained-looking cross-attention over 6 distinct random images, the transformers GPT-2
    it wraps and its weight file: the reference world of the search, captioner and inference tests."""
    import torch

    from hw3.models import captioner
    from hw3.models.gpt2 import Config
    from tiny_models import CAPTION_ENCODER, ending_gpt2, randomize_trainable, save_course_format

    folder = tmp_path_factory.mktemp("captioning")
    gpt2 = ending_gpt2()
    weights = save_course_format(gpt2, folder / "decoder_model.bin")
    model = captioner.build_captioner(CAPTION_ENCODER, Config(checkpoint=weights))
    randomize_trainable(model.decoder)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 32, 32, generator=g) * 0.5 + torch.randn(6, 3, 1, 1, generator=g) * 2  # distinct
    return dict(folder=folder, gpt2=gpt2, weights=weights, model=model.eval(), images=images,
                feats=model.image_tokens(images))



# `bash test.sh` runs the suite on two xdist workers with --dist loadgroup, where a session fixture is built once per
# worker. Each module is one group (its module fixtures are built once, on one worker), except that the tests of a
# session fixture named in SESSION_GROUPS form one group across modules, and tests marked with an xdist_group of
# their own keep it. The groups are handed out in LONGEST_FIRST's order, so that no long group starts last; the rest
# follow in collection order.
SESSION_GROUPS = {"demo_run": "demo"}  # tests/e2e/conftest.py
LONGEST_FIRST = ("demo",)


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests that must share one xdist worker")
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.7 sorts groups by test count instead
        config.option.loadscopereorder = False


def group_of(item) -> str:
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return mark.args[0] if mark.args else mark.kwargs.get("name", "default")
    shared = [group for fixture, group in SESSION_GROUPS.items() if fixture in item.fixturenames]
    return shared[0] if shared else item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    groups = {item.nodeid: group_of(item) for item in items}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))
