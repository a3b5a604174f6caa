"""The plan's size estimates against the models they estimate: the image tokens of an encoder spec (its timm options
over its name's), and the trained parameters of a P2 attempt's captioner as p2_train.py builds it."""
from __future__ import annotations

import pytest
import torch

import tiny_models
from hw3.models import registry
from hw3.models.captioner import build_captioner
from hw3.models.encoder import ImageEncoder
from hw3.training import cli
from hw3.util import resources


@pytest.mark.parametrize("spec", [tiny_models.TINY_ENCODER, tiny_models.CAPTION_ENCODER])
def test_vit_shape_reads_the_spec_options_as_timm_builds_them(spec):
    shape = resources.vit_shape(spec)
    encoder = ImageEncoder(spec)
    size = encoder.model.patch_embed.img_size
    with torch.no_grad():
        tokens = encoder(torch.zeros(1, 3, *size))
    assert (shape["tokens"], shape["width"]) == tuple(tokens.shape[1:])
    assert (shape["layers"], shape["heads"]) == (len(encoder.model.blocks), encoder.model.blocks[0].attn.num_heads)


def test_vit_shape_of_a_named_vit_without_options():
    assert resources.vit_shape("timm:vit_huge_patch14_clip_quickgelu_224.dfn5b") == dict(
        tokens=257, width=1280, layers=32, heads=16, parameters=12 * 32 * 1280 ** 2)
    assert resources.vit_shape("timm:resnet101.tv2_in1k") is None


@pytest.mark.parametrize("peft", ["lora", "adapter", "prefix"])
def test_model_shapes_count_the_trained_parameters_the_captioner_has(peft, tmp_path):
    """Cross-attention included: the estimate builds the decoder with the encoder's width, as build_captioner does."""
    weights = tiny_models.tiny_gpt2(str(tmp_path / "gpt2.bin"))
    options = cli.command_settings(cli.parse_config(["--peft", peft, "--decoder-weights", weights, "--encoder",
                                                     tiny_models.CAPTION_ENCODER, "--out", str(tmp_path / "o")]
                                                    + [x for k in ("train", "val") for x in (
                                                        "--%s-json" % k, "c.json", "--%s-images" % k, "img")]))
    width = resources.vit_shape(tiny_models.CAPTION_ENCODER)["width"]
    shape = resources.ModelShapes(lambda: (), width)(options)
    captioner = build_captioner(tiny_models.CAPTION_ENCODER, registry.config_from_args(options))
    assert shape["trainable"] == sum(p.numel() for p in captioner.decoder.parameters() if p.requires_grad) > 0
