"""encoder: the timm ViT returns all its tokens, specs parse and round-trip, weights are checked before any build,
local weight files (timm's or open_clip's layout) load strictly."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from common import UserError
from encoder import DEFAULT_ENCODER, EncoderSpec, ImageEncoder, timm_weights_cached
from tiny_models import CAPTION_ENCODER, open_clip_tokens


@pytest.fixture(scope="module")
def world(captioning_world):
    return captioning_world


def test_timm_encoder_gives_all_tokens(world):
    encoder = world["model"].encoder
    assert (encoder.width, encoder.num_prefix_tokens, encoder.grid_size) == (32, 1, (4, 4))
    feats = encoder(world["images"])
    assert feats.shape == (6, 1 + 4 * 4, 32)
    assert torch.equal(feats, encoder.model.forward_features(world["images"]))
    assert not any(p.requires_grad for p in encoder.parameters())
    world["model"].train()
    assert not encoder.training and world["model"].decoder.training
    world["model"].eval()


def test_random_encoder_is_reproducible(world):
    again = ImageEncoder(CAPTION_ENCODER)
    assert torch.equal(again(world["images"]), world["feats"])


def test_encoder_transform_matches_input_size(world):
    from PIL import Image

    pixels = world["model"].encoder.transform(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert pixels.shape == (3, 32, 32)


def test_spec_parsing_and_round_trips():
    spec = EncoderSpec.parse("timm:vit_x.tag@none?img_size=32&flag=true&name=ab")
    assert spec == EncoderSpec("vit_x.tag", "none", (("img_size", 32), ("flag", True), ("name", "ab")))
    assert spec.random and spec.weight_file is None
    assert str(spec) == "timm:vit_x.tag@none?img_size=32&flag=true&name=ab"
    assert EncoderSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec  # as checkpoints save it
    assert EncoderSpec.from_json(str(spec)) == spec  # as older checkpoints saved it
    on_file = EncoderSpec.parse("timm:vit_x@/c/d@e.pt")
    assert (on_file.name, on_file.weight_file) == ("vit_x@/c/d", "e.pt")
    assert EncoderSpec.parse(DEFAULT_ENCODER).weights is None and str(EncoderSpec.parse(DEFAULT_ENCODER)) == DEFAULT_ENCODER
    for bad in ("vit_x", "keras:vit", "open_clip:ViT-B-32@openai", "timm:", "timm:vit?img_size"):
        with pytest.raises(UserError, match="encoder spec"):
            EncoderSpec.parse(bad)
    with pytest.raises(UserError, match="encoder spec"):
        EncoderSpec.from_json({"weights": "none"})


def test_default_encoder_is_a_timm_pretrained_name():
    import timm

    name = EncoderSpec.parse(DEFAULT_ENCODER).name
    assert name in timm.list_pretrained(name.split(".")[0] + ".*")


def test_missing_pretrained_weights_fail_fast_offline():
    start = time.time()
    with pytest.raises(UserError, match="hw3_download.sh"):
        ImageEncoder(DEFAULT_ENCODER, offline=True)
    assert time.time() - start < 1.0
    with pytest.raises(UserError, match="not found"):
        ImageEncoder("timm:vit_tiny_patch16_224@/no/such/file.pt")
    with pytest.raises(UserError, match="unknown timm model"):
        ImageEncoder("timm:no_such_vit@none")


def test_timm_loads_an_open_clip_checkpoint_file_like_open_clip(tmp_path):
    """The real loading path offline: an open_clip CLIP checkpoint file read by timm (NAME@FILE, converted by timm's
    own checkpoint filter) gives the tokens of the open_clip visual tower read from the same file."""
    import clip_utils

    config = str(tmp_path / "tiny_clip.json")
    with open(config, "w") as f:
        json.dump({"embed_dim": 64, "vision_cfg": {"image_size": 96, "layers": 4, "width": 128, "head_width": 64,
                                                   "patch_size": 16},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}, f)

    clip, _, _ = clip_utils.load_clip(config, None)
    weights = str(tmp_path / "open_clip_pytorch_model.bin")
    torch.save(clip.state_dict(), weights)
    by_timm = ImageEncoder("timm:vit_base_patch16_clip_224@%s?img_size=96&embed_dim=128&depth=4&num_heads=2" % weights)
    assert (by_timm.width, by_timm.num_prefix_tokens, by_timm.grid_size) == (128, 1, (6, 6))
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(by_timm(images), open_clip_tokens(clip.visual.eval(), images), atol=1e-4)


def test_timm_file_missing_tensors_is_refused(tmp_path):
    """A local timm weight file that lacks tensors (here the last block) is refused with one error naming the file
    and what is missing; timm's own pretrained loader would have left that block random without a word."""
    spec = "timm:vit_base_patch16_clip_224@%s?img_size=32&patch_size=8&embed_dim=64&depth=2&num_heads=2"
    model = ImageEncoder(spec % "none").model
    whole, partial = str(tmp_path / "whole.pt"), str(tmp_path / "partial.pt")
    torch.save(model.state_dict(), whole)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}, partial)
    loaded = ImageEncoder(spec % whole)
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match=r"partial\.pt do not fit timm .*missing \['blocks\.1\."):
        ImageEncoder(spec % partial)


def test_saved_relative_paths_resolve_from_the_repository(tmp_path, monkeypatch):
    import encoder

    spec = EncoderSpec.parse("timm:vit_x@miniworld/models/caption_vit.pt?img_size=96")
    monkeypatch.chdir(tmp_path)
    assert spec.from_repo_root().weight_file == os.path.join(encoder.ROOT, "miniworld/models/caption_vit.pt")
    assert EncoderSpec.parse("timm:vit_x@none").from_repo_root() == EncoderSpec.parse("timm:vit_x@none")
    (tmp_path / "here.pt").write_bytes(b"")
    assert EncoderSpec.parse("timm:vit_x@here.pt").from_repo_root().weight_file == "here.pt"  # the working folder wins


def test_hub_cache_check_takes_exactly_the_files_timm_reads(tmp_path, monkeypatch):
    """timm reads a hub weight file's safetensors alternative first (its own _get_safe_alternatives), then the file:
    the pre-check accepts those and nothing else, so it never passes a cache the loader would then reject."""
    import timm
    from huggingface_hub import constants

    name = DEFAULT_ENCODER.split(":", 1)[1]
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    repo, filename = cfg["hf_hub_id"], cfg.get("hf_hub_filename") or "pytorch_model.bin"
    safe = {"pytorch_model.bin": "model.safetensors",
            "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(filename, filename[:-4] + ".safetensors")
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    (cache / ("models--" + repo.replace("/", "--")) / "refs").mkdir(parents=True)
    (cache / ("models--" + repo.replace("/", "--")) / "refs" / "main").write_text("0" * 40)
    snapshot.mkdir(parents=True)
    assert timm_weights_cached(name) is None
    (snapshot / "unrelated.safetensors").write_bytes(b"x")
    assert timm_weights_cached(name) is None
    for present in (filename, safe):
        for f in snapshot.iterdir():
            f.unlink()
        (snapshot / present).write_bytes(b"x")
        assert timm_weights_cached(name) == str(snapshot / present)
