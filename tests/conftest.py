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



# `bash test.sh` runs the suite on two xdist workers with --dist loadfile: each module runs on
# one worker, so its module fixtures are built once, and a session fixture (tests/e2e/conftest.py's demo_run) once per
# module that uses it: its readers share one module. (--dist loadgroup would allow groups across modules, but
# pytest-xdist 3.8 cannot label test ids under pytest 9.) The modules are handed out in LONGEST_FIRST's order, so that
# no long one starts last; the rest follow in collection order.
LONGEST_FIRST = ("tests/e2e/test_demo.py", "tests/e2e/test_run_all.py", "tests/e2e/test_toolkit_run.py",
                 "tests/e2e/test_run_all_inputs.py", "tests/unit/training/test_trainer.py",
                 "tests/unit/evaluation/test_evaluate.py", "tests/unit/models/test_gpt2.py",
                 "tests/unit/inference/test_predict.py", "tests/unit/models/test_search.py",
                 "tests/unit/report/test_compose.py", "tests/unit/evaluation/test_metrics.py",
                 "tests/unit/zeroshot/test_classify.py")  # then the short ones: the last to finish end close together


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.7 sorts modules by test count instead
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
