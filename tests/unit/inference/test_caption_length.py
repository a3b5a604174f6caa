"""The committed world checkpoints record no caption length, so they decode exactly as before that record existed:
through p2_inference.py (hw3_2.sh's code, which now counts cut captions) they give the captions of the plain search
with the README defaults (and their recommended settings), on a few world val images."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from hw3.inference import predict
from hw3.models import decoding, search
from hw3.models.decoding import DecodingSettings
from hw3.models.captioner import config_path, load_captioner, read_checkpoint_config
from hw3.data.images import load_rgb
from miniworld import generate
from hw3 import REPO_ROOT as ROOT

MODELS = os.path.join(ROOT, "miniworld", "models")
CHECKPOINTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(MODELS, "*.pt"))
                     if os.path.isfile(config_path(p)) and json.load(open(config_path(p))).get("decoder"))
VAL_IMAGES = 8


@pytest.fixture(scope="module")
def val_images(tmp_path_factory):
    """The first images of the world's val split (the demo's, seed 0: a prefix of the full split)."""
    out = str(tmp_path_factory.mktemp("val"))
    generate.write_p2_split(out, 0, "val", VAL_IMAGES, 1)
    return os.path.join(out, "p2", "images", "val")


def test_every_committed_captioner_is_checked():
    assert len(CHECKPOINTS) >= 10 and "p2_lora.pt" in CHECKPOINTS and "p2_transformer.pt" in CHECKPOINTS


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_committed_checkpoints_decode_as_before(val_images, name, tmp_path):
    checkpoint = os.path.join(MODELS, name)
    meta = read_checkpoint_config(checkpoint)
    assert decoding.DATA_LENGTH_KEY not in meta
    before = dict(decoding.DECODE_DEFAULTS, **{k: v for k, v in (meta.get(decoding.INFERENCE_KEY) or {}).items()
                                             if k in decoding.DECODE_DEFAULTS})
    settings, _ = decoding.resolve_decoding({}, meta)
    assert {k: getattr(settings, k) for k in decoding.DECODE_DEFAULTS} == before
    out = tmp_path / "pred.json"
    captioned = predict.run([val_images, str(out), os.path.join(MODELS, "decoder_model.bin"), "--checkpoint",
                                  checkpoint, "--device", "cpu", "--num-workers", "0"])
    model, _ = load_captioner(checkpoint, os.path.join(MODELS, "decoder_model.bin"))
    names = sorted(os.listdir(val_images))
    pixels = torch.stack([model.encoder.transform(load_rgb(os.path.join(val_images, n))) for n in names])
    with torch.no_grad():
        plain = search.decode_captions(model.generate(pixels, DecodingSettings(**before)))
    assert json.loads(out.read_text()) == {os.path.splitext(n)[0]: c for n, c in zip(names, plain)}
    assert captioned["cut"] == 0 and captioned["max_len"] == before["max_len"]
