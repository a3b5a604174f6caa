"""common.autocast: fp16 autocast only on CUDA, and on CPU no autocast context at all, so torch 1.12 (which warns at
every torch.autocast("cuda") on a machine without CUDA, enabled or not) prints nothing."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image

from hw3.inference import predict
from hw3.models.decoding import DEFAULT_DECODING
from hw3.util.device import autocast


def test_autocast_on_cpu_is_no_context_and_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for device in ("cpu", torch.device("cpu")):
            for enabled in (True, False):
                with autocast(device, enabled):
                    assert not torch.is_autocast_enabled()


def test_cpu_captioning_warns_nothing(captioning_world, tmp_path):
    """p2_inference's captioning loop with fp16 asked for, on CPU: the path where torch 1.12 warned per batch."""
    rng = np.random.RandomState(0)
    names = ["%d.png" % i for i in range(3)]
    for name in names:
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype(np.uint8)).save(os.path.join(str(tmp_path), name))
    settings = DEFAULT_DECODING.replace(max_len=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        captions, _ = predict.caption_folder(captioning_world["model"], str(tmp_path), names, settings,
                                             predict.Runtime(torch.device("cpu"), batch_size=2, num_workers=0,
                                                             fp16=True))
    assert len(captions) == len(names) and all(isinstance(c, str) for c in captions)
