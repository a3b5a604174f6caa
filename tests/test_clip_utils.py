"""clip_utils: tiny configs load with random weights, round-trip through a checkpoint file, fail fast and clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import clip_utils  # noqa: E402
from common import UserError  # noqa: E402

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_config(folder, name="tiny-clip-test", **changes) -> str:
    config = json.loads(json.dumps(TINY_CONFIG))
    config.update(changes)
    path = os.path.join(str(folder), name + ".json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def encode(model, tokenizer, images):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(["a photo of a cat", "no dog, no score."]))


def test_tiny_config_loads_random_and_reloads_from_file(tmp_path):
    config = write_config(tmp_path)
    model, preprocess, tokenizer = clip_utils.load_clip(config, None)
    assert not model.training
    ids = tokenizer(["a photo of a cat"])
    assert ids.shape == (1, TINY_CONFIG["text_cfg"]["context_length"])

    from PIL import Image

    tensor = preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert tensor.shape == (3, 32, 32)

    weights = os.path.join(str(tmp_path), "tiny.pt")
    torch.save(model.state_dict(), weights)
    reloaded, _, _ = clip_utils.load_clip(config, weights)
    images = torch.randn(3, 3, 32, 32)
    for a, b in zip(encode(model, tokenizer, images), encode(reloaded, tokenizer, images)):
        assert torch.equal(a, b)


def test_missing_tag_fails_fast_offline_with_one_line():
    """In a fresh process (so the import cost is paid first), an uncached tag fails in well under a second."""
    code = (
        "import time, clip_utils, open_clip\n"
        "t = time.time()\n"
        "try:\n"
        "    clip_utils.load_clip('ViT-B-32', 'laion2b_s34b_b79k')\n"
        "except clip_utils.UserError as e:\n"
        "    print(repr(time.time() - t)); print(e)\n"
    )
    env = dict(os.environ, HF_HOME=os.path.join(ROOT, ".no-such-hf-home"), XDG_CACHE_HOME="/nonexistent-cache")
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert float(lines[0]) < 1.0
    assert "hw3_download.sh" in lines[1] and "--pretrained PATH" in lines[1]


def test_unknown_tag_lists_the_model_tags():
    with pytest.raises(UserError, match="openai"):
        clip_utils.load_clip("ViT-B-32", "no-such-tag")


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(UserError, match="ViT-B-32"):
        clip_utils.load_clip("ViT-B-33", None)


def test_bad_config_paths_name_the_file(tmp_path):
    missing = os.path.join(str(tmp_path), "missing.json")
    with pytest.raises(UserError, match="missing.json"):
        clip_utils.load_clip(missing, None)
    broken = os.path.join(str(tmp_path), "broken.json")
    with open(broken, "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="broken.json"):
        clip_utils.load_clip(broken, None)
    incomplete = os.path.join(str(tmp_path), "incomplete.json")
    with open(incomplete, "w") as f:
        json.dump({"embed_dim": 8}, f)
    with pytest.raises(UserError, match="incomplete.json.*vision_cfg"):
        clip_utils.load_clip(incomplete, None)


def test_bad_checkpoints_name_the_file(tmp_path):
    config = write_config(tmp_path)
    corrupt = os.path.join(str(tmp_path), "corrupt.pt")
    with open(corrupt, "wb") as f:
        f.write(b"this is not a checkpoint")
    with pytest.raises(UserError, match="corrupt.pt is not a readable"):
        clip_utils.load_clip(config, corrupt)
    with pytest.raises(UserError, match="not found.*absent.pt"):
        clip_utils.load_clip(config, os.path.join(str(tmp_path), "absent.pt"))

    other = write_config(tmp_path, name="other-tiny-clip", embed_dim=16)
    model, _, _ = clip_utils.load_clip(other, None)
    mismatched = os.path.join(str(tmp_path), "other.pt")
    torch.save(model.state_dict(), mismatched)
    with pytest.raises(UserError, match="other.pt does not fit"):
        clip_utils.load_clip(config, mismatched)


def test_cached_weights_finds_url_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    url = "https://example.org/clip/models/abc/ViT-X.pt"
    assert clip_utils.cached_weights({"url": url}) is None
    os.makedirs(os.path.join(str(tmp_path), ".cache", "clip"))
    target = os.path.join(str(tmp_path), ".cache", "clip", "ViT-X.pt")
    open(target, "wb").close()
    assert clip_utils.cached_weights({"url": url}) == target


def test_download_goes_online_and_loading_goes_back_offline(tmp_path, monkeypatch):
    import open_clip

    seen = {}
    target = os.path.join(str(tmp_path), "weights.bin")
    open(target, "wb").close()

    def fake_download(config, *args, **kwargs):
        seen["offline"] = os.environ.get("HF_HUB_OFFLINE")
        seen["config"] = config
        return target

    monkeypatch.setattr(open_clip, "download_pretrained", fake_download)
    monkeypatch.setattr(clip_utils, "cached_weights", lambda config: None)
    assert clip_utils.download_clip("ViT-B-32", "laion2b_s34b_b79k") == target
    assert seen["offline"] == "0" and seen["config"] == open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(UserError, match="hw3_download.sh"):
        clip_utils.load_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
