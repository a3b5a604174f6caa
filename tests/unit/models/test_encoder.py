"""encoder: the timm ViT returns all its tokens, a timm CNN its feature map as grid tokens, specs parse and round-trip,
weights are checked before any build, local weight files (timm's, open_clip's or torchvision's layout) load strictly."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from hw3.util.errors import UserError
from hw3.models.encoder import (DEFAULT_CNN_ENCODER, DEFAULT_ENCODER, RANDOM_INIT_SEED, EncoderSpec, ImageEncoder,
                                coordinate_mapper, display_image, download_command, timm_weights_cached)
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
    from hw3.models import clip_backend

    config = str(tmp_path / "tiny_clip.json")
    with open(config, "w") as f:
        json.dump({"embed_dim": 64, "vision_cfg": {"image_size": 96, "layers": 4, "width": 128, "head_width": 64,
                                                   "patch_size": 16},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}, f)

    clip, _, _ = clip_backend.load_clip(config, None)
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
    from hw3.models import encoder

    spec = EncoderSpec.parse("timm:vit_x@miniworld/models/caption_vit.pt?img_size=96")
    monkeypatch.chdir(tmp_path)
    assert spec.from_repo_root().weight_file == os.path.join(encoder.REPO_ROOT, "miniworld/models/caption_vit.pt")
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


# ----------------------------------------------------------------------------------------------- CNN encoders

CNN = "timm:resnet10t@none"  # timm's smallest ResNet, random weights: the CNN path offline in a fraction of a second
WIDE_CNN = 'timm:resnet10t@none?pretrained_cfg_overlay={"test_input_size":[3,64,96]}'  # a non-square input size


def timm_reference(name: str, **kwargs) -> torch.nn.Module:
    """The same seeded random timm model, built by timm directly."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def marked_image(size, box):
    """A black image with a white rectangle."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    return image


def test_cnn_encoder_gives_its_feature_map_as_grid_tokens():
    """Token i * w + j is the feature vector of grid cell (i, j), as timm computes it (in eval mode: the probe forward
    that sizes the grid left batch norm's statistics alone)."""
    encoder = ImageEncoder(CNN)
    assert (encoder.is_cnn, encoder.width, encoder.num_prefix_tokens) == (True, 512, 0)
    assert (encoder.grid_size, encoder.input_size) == ((7, 7), (224, 224))  # timm's test size for resnet10t
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = encoder(images)
        feature_map = timm_reference("resnet10t").forward_features(images)  # (B, C, h, w)
    assert tokens.shape == (2, 7 * 7, 512) and feature_map.shape == (2, 512, 7, 7)
    assert torch.equal(tokens, feature_map.permute(0, 2, 3, 1).reshape(2, 49, 512))
    assert torch.equal(tokens[:, 3 * 7 + 5], feature_map[:, :, 3, 5])
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training


def test_cnn_grid_follows_the_data_config_input_size():
    """The grid comes from a forward at the input size of the model's data config (here non-square), and the
    transform gives images of that size."""
    from PIL import Image

    encoder = ImageEncoder(WIDE_CNN)
    assert (encoder.input_size, encoder.grid_size) == ((64, 96), (2, 3))
    pixels = encoder.transform(Image.new("RGB", (300, 120), (10, 200, 30)))
    assert pixels.shape == (3, 64, 96)
    with torch.no_grad():
        tokens = encoder(pixels.unsqueeze(0))
        reference = timm_reference("resnet10t").forward_features(pixels.unsqueeze(0))  # (1, 512, 2, 3)
    assert torch.equal(tokens, reference.flatten(2).transpose(1, 2))


def test_resnet101_tv2_is_torchvisions_eval_recipe():
    """The classic captioners' CNN (random weights here) at torchvision's evaluation size: resize 232, crop 224, a
    7x7 grid of 2048-wide tokens."""
    encoder = ImageEncoder(DEFAULT_CNN_ENCODER + "@none")
    assert (encoder.width, encoder.num_prefix_tokens, encoder.grid_size, encoder.input_size) == (2048, 0, (7, 7),
                                                                                                 (224, 224))
    assert [type(step).__name__ for step in encoder.transform.transforms[:2]] == ["Resize", "CenterCrop"]
    assert display_image(marked_image((300, 240), (0, 0, 1, 1)), encoder.transform).size == (224, 224)


def test_cnn_coordinate_mapping_finds_a_mark_where_the_encoder_saw_it():
    """A white square in the original image, found in the image the CNN sees (resized, cropped, non-square), maps
    back onto the square; the grid spans the whole shown image, so each cell maps through the same function."""
    import numpy as np

    encoder = ImageEncoder(WIDE_CNN)
    original = marked_image((200, 120), (120, 50, 139, 69))  # centre (129.5, 59.5)
    shown_size, to_original = coordinate_mapper(original.size, encoder.transform)
    shown = display_image(original, encoder.transform)
    assert shown_size == shown.size == encoder.input_size[::-1]
    ys, xs = np.nonzero(np.asarray(shown)[..., 0] > 127)
    x, y = to_original(xs.mean(), ys.mean())
    assert abs(x - 129.5) < 2.5 and abs(y - 59.5) < 2.5


def test_neither_vit_nor_cnn_is_refused_naming_the_spec():
    spec = "timm:swin_tiny_patch4_window7_224@none?depths=[1,1,1,1]&num_heads=[1,1,1,1]&embed_dim=32"
    with pytest.raises(UserError, match=r"^encoder timm:swin_tiny.* is neither a ViT with patch tokens nor a CNN "
                                        r"with a \(B, C, h, w\) feature map: its forward_features gives "
                                        r"\(1, 7, 7, 256\)$"):  # Swin's features are (B, h, w, C)
        ImageEncoder(spec)


def test_missing_cnn_weights_fail_fast_offline_naming_the_download(monkeypatch):
    from hw3.models import encoder

    monkeypatch.setattr(encoder, "timm_weights_cached", lambda name: None)  # whatever this machine's cache holds
    start = time.time()
    with pytest.raises(UserError, match=r"resnet101\.tv2_in1k are not downloaded .* run `bash hw3_download\.sh "
                                        r"--cnn resnet101\.tv2_in1k` \(online\)"):
        ImageEncoder(DEFAULT_CNN_ENCODER, offline=True)
    assert time.time() - start < 1.0
    assert download_command(DEFAULT_ENCODER) == "bash hw3_download.sh"  # the default encoder needs no option
    assert download_command("timm:vit_large_patch14_clip_224.openai") == (
        "bash hw3_download.sh --encoder vit_large_patch14_clip_224.openai")  # any other: --encoder, not --cnn


def test_cnn_loads_a_torchvision_layout_file_strictly(tmp_path):
    """timm's ResNets keep torchvision's tensor names: a torchvision-style file (with its 1000-class fc, which the
    encoder does not use) loads; one missing a stage is refused."""
    model = timm_reference("resnet10t")
    state = dict(model.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    whole, partial = str(tmp_path / "resnet.pth"), str(tmp_path / "partial.pth")
    torch.save(state, whole)
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    loaded = ImageEncoder("timm:resnet10t@%s" % whole)
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match=r"partial\.pth do not fit timm resnet10t.*missing \['layer4\."):
        ImageEncoder("timm:resnet10t@%s" % partial)
