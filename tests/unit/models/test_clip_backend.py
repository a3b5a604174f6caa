"""hw3.models.clip_backend: tiny configs load with random weights, round-trip through a checkpoint file, fail fast and clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hw3 import REPO_ROOT as ROOT

sys.path.insert(0, ROOT)

from hw3.models import clip_backend  # noqa: E402
from hw3.util.errors import UserError  # noqa: E402

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
    model, preprocess, tokenizer = clip_backend.load_clip(config, None)
    assert not model.training
    ids = tokenizer(["a photo of a cat"])
    assert ids.shape == (1, TINY_CONFIG["text_cfg"]["context_length"])

    from PIL import Image

    tensor = preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert tensor.shape == (3, 32, 32)

    weights = os.path.join(str(tmp_path), "tiny.pt")
    torch.save(model.state_dict(), weights)
    reloaded, _, _ = clip_backend.load_clip(config, weights)
    images = torch.randn(3, 3, 32, 32)
    for a, b in zip(encode(model, tokenizer, images), encode(reloaded, tokenizer, images)):
        assert torch.equal(a, b)


def test_missing_tag_fails_fast_offline_with_one_line(tmp_path):
    """In a fresh process (so the import cost is paid first), an uncached tag fails in well under a second."""
    code = (
        "import time, open_clip\n"
        "from hw3.models import clip_backend as clip_utils\n"
        "t = time.time()\n"
        "try:\n"
        "    clip_utils.load_clip('ViT-B-32', 'laion2b_s34b_b79k')\n"
        "except clip_utils.UserError as e:\n"
        "    print(repr(time.time() - t)); print(e)\n"
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME="/nonexistent-cache")  # the hub writes there
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stderr
    assert float(lines[0]) < 1.0
    assert "hw3_download.sh" in lines[1] and "--pretrained PATH" in lines[1]


def test_unknown_tag_lists_the_model_tags():
    with pytest.raises(UserError, match="openai"):
        clip_backend.load_clip("ViT-B-32", "no-such-tag")


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(UserError, match="ViT-B-32"):
        clip_backend.load_clip("ViT-B-33", None)


def test_bad_config_paths_name_the_file(tmp_path):
    missing = os.path.join(str(tmp_path), "missing.json")
    with pytest.raises(UserError, match="missing.json"):
        clip_backend.load_clip(missing, None)
    broken = os.path.join(str(tmp_path), "broken.json")
    with open(broken, "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="broken.json"):
        clip_backend.load_clip(broken, None)
    incomplete = os.path.join(str(tmp_path), "incomplete.json")
    with open(incomplete, "w") as f:
        json.dump({"embed_dim": 8}, f)
    with pytest.raises(UserError, match="incomplete.json.*vision_cfg"):
        clip_backend.load_clip(incomplete, None)


def test_bad_checkpoints_name_the_file(tmp_path):
    config = write_config(tmp_path)
    corrupt = os.path.join(str(tmp_path), "corrupt.pt")
    with open(corrupt, "wb") as f:
        f.write(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read CLIP weight file .*corrupt.pt"):
        clip_backend.load_clip(config, corrupt)
    with pytest.raises(UserError, match="not found.*absent.pt"):
        clip_backend.load_clip(config, os.path.join(str(tmp_path), "absent.pt"))

    other = write_config(tmp_path, name="other-tiny-clip", embed_dim=16)
    model, _, _ = clip_backend.load_clip(other, None)
    mismatched = os.path.join(str(tmp_path), "other.pt")
    torch.save(model.state_dict(), mismatched)
    with pytest.raises(UserError, match="other.pt does not fit"):
        clip_backend.load_clip(config, mismatched)


def test_cached_weights_finds_url_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    url = "https://example.org/clip/models/abc/ViT-X.pt"
    assert clip_backend.cached_weights({"url": url}) is None
    os.makedirs(os.path.join(str(tmp_path), ".cache", "clip"))
    target = os.path.join(str(tmp_path), ".cache", "clip", "ViT-X.pt")
    open(target, "wb").close()
    assert clip_backend.cached_weights({"url": url}) == target


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
    monkeypatch.setattr(clip_backend, "cached_weights", lambda config: None)
    assert clip_backend.download_clip("ViT-B-32", "laion2b_s34b_b79k") == target
    assert seen["offline"] == "0" and seen["config"] == open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(UserError, match="hw3_download.sh"):
        clip_backend.load_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# ------------------------------------------------------------------------- open_clip's own choice of cached file

HUB_REPO = "timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k"


def fake_hub_cache(root, repo, filenames):
    """huggingface_hub's cache layout: models--org--name/refs/main -> snapshots/<commit>/<file>."""
    folder = os.path.join(str(root), "models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    os.makedirs(os.path.join(folder, "snapshots", commit), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    for name in filenames:
        with open(os.path.join(folder, "snapshots", commit, name), "wb") as f:
            f.write(b"weights")
    return os.path.join(folder, "snapshots", commit)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path))
    return cache


@pytest.mark.parametrize("filename", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_cached_weights_is_the_file_open_clip_reads(hub_cache, filename):
    import open_clip

    config = open_clip.get_pretrained_cfg("EVA02-L-14", "merged2b_s4b_b131k")
    assert clip_backend.cached_weights(config) is None
    snapshot = fake_hub_cache(hub_cache, HUB_REPO, [filename, "unrelated.bin"])
    assert clip_backend.cached_weights(config) == os.path.join(snapshot, filename)


def test_a_file_this_open_clip_cannot_read_is_rejected_with_our_line(hub_cache, monkeypatch):
    """An open_clip without safetensors support reads only the .bin: a cache holding only the .safetensors is missing
    weights for it, reported with our one line rather than the hub's wording."""
    import open_clip

    fake_hub_cache(hub_cache, HUB_REPO, ["open_clip_model.safetensors"])
    monkeypatch.setattr(open_clip.pretrained, "_has_safetensors", False)
    assert clip_backend.cached_weights(open_clip.get_pretrained_cfg("EVA02-L-14", "merged2b_s4b_b131k")) is None
    with pytest.raises(UserError) as caught:
        clip_backend.load_clip("EVA02-L-14", "merged2b_s4b_b131k")
    assert str(caught.value).startswith("weights EVA02-L-14/merged2b_s4b_b131k are not in the local cache")
    assert "hw3_download.sh" in str(caught.value)


def test_a_url_file_does_not_count_when_open_clip_would_use_the_hub(hub_cache, tmp_path):
    url = "https://example.org/clip/models/abc/ViT-X.pt"
    os.makedirs(os.path.join(str(tmp_path), ".cache", "clip"))
    open(os.path.join(str(tmp_path), ".cache", "clip", "ViT-X.pt"), "wb").close()
    assert clip_backend.cached_weights({"url": url, "hf_hub": "org/vit-x/"}) is None
    snapshot = fake_hub_cache(hub_cache, "org/vit-x", ["open_clip_pytorch_model.bin"])
    assert clip_backend.cached_weights({"url": url, "hf_hub": "org/vit-x/"}) == os.path.join(
        snapshot, "open_clip_pytorch_model.bin")


def test_the_cache_look_up_leaves_the_hub_online_when_it_was(hub_cache, monkeypatch):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert clip_backend.cached_weights(open_clip.get_pretrained_cfg("EVA02-L-14", "merged2b_s4b_b131k")) is None
    assert os.environ["HF_HUB_OFFLINE"] == "0"


# ------------------------------------------------------------------------------------- OpenAI's clip package

def test_backend_choice(monkeypatch):
    imports = {"open_clip": (object(), None), "openai": (object(), None)}
    monkeypatch.setattr(clip_backend, "_import_backend", lambda backend: imports[backend])
    assert clip_backend.resolve_backend("auto") == "open_clip"
    assert clip_backend.resolve_backend("openai") == "openai"
    imports["open_clip"] = (None, "No module named 'open_clip'")
    assert clip_backend.resolve_backend("auto") == "openai"
    with pytest.raises(UserError, match="--backend open_clip needs open_clip_torch"):
        clip_backend.resolve_backend("open_clip")
    imports["openai"] = (None, "No module named 'clip'")
    with pytest.raises(UserError) as caught:
        clip_backend.resolve_backend("auto")
    assert "open_clip_torch" in str(caught.value) and "openai-clip" in str(caught.value)
    assert "\n" not in str(caught.value)


def encode_openai(model, tokenizer, images):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(["a photo of a cat", "no dog, no score."]))


@pytest.mark.parametrize("form", ["state_dict", "torchscript"])
def test_openai_weight_files_rebuild_the_model(tmp_path, form, monkeypatch):
    from tiny_openai_clip import TINY, save_state_dict, save_torchscript, tiny_openai_clip

    original = tiny_openai_clip()
    save = save_state_dict if form == "state_dict" else save_torchscript
    path = save(original, os.path.join(str(tmp_path), "tiny.pt"))
    if form == "torchscript":  # TorchScript archives load only when OpenAI released them: make this one "released"
        released = dict(clip_backend._openai_release_sha256s(), **{clip_backend.file_sha256(path): "tiny"})
        monkeypatch.setattr(clip_backend, "_openai_release_sha256s", lambda: released)
    model, preprocess, tokenizer = clip_backend.load_clip("ViT-L/14@336px", path, backend="openai")
    assert not model.training and model.dtype == torch.float32
    assert tokenizer(["a photo of a cat " * 10]).shape == (1, TINY["context_length"])  # long prompts are cut

    from PIL import Image

    assert preprocess(Image.new("RGB", (50, 40), (200, 10, 10))).shape == (3, 32, 32)
    images = torch.randn(3, 3, 32, 32)
    for a, b in zip(encode_openai(original, tokenizer, images), encode_openai(model, tokenizer, images)):
        assert torch.equal(a, b)


def test_a_torchscript_archive_openai_did_not_release_is_refused(tmp_path, monkeypatch):
    """TorchScript can run code while it loads, so only OpenAI's own archives (by SHA-256) are loaded."""
    from tiny_openai_clip import save_torchscript, tiny_openai_clip

    path = save_torchscript(tiny_openai_clip(), os.path.join(str(tmp_path), "other.pt"))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran on an unknown archive"))
    with pytest.raises(UserError, match="other.pt is a TorchScript archive but not one of OpenAI's released files"):
        clip_backend.load_clip("ViT-L/14@336px", path, backend="openai")


def test_state_dict_files_are_read_through_safe_load(tmp_path, monkeypatch):
    from hw3.util import safe_load

    path = os.path.join(str(tmp_path), "weights.pt")
    torch.save({"x": torch.ones(2)}, path)
    seen = []
    real = safe_load.load
    monkeypatch.setattr(safe_load, "load", lambda f, what="file", **kw: seen.append(f) or real(f, what, **kw))
    assert torch.equal(clip_backend.read_openai_weights(path)["x"], torch.ones(2))
    assert seen == [path]


def test_openai_bad_weights_say_which_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="not found.*absent.pt"):
        clip_backend.load_clip("ViT-L/14@336px", os.path.join(str(tmp_path), "absent.pt"), backend="openai")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot read CLIP weight file .*corrupt.pt"):
        clip_backend.load_clip("ViT-L/14@336px", str(corrupt), backend="openai")
    other = str(tmp_path / "other.pt")
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="other.pt is not an OpenAI CLIP state dict"):
        clip_backend.load_clip("ViT-L/14@336px", other, backend="openai")
    with pytest.raises(UserError, match="no random weights"):
        clip_backend.load_clip("ViT-L/14@336px", None, backend="openai")
    with pytest.raises(UserError, match="unknown OpenAI CLIP model 'ViT-L/14@337px'.*ViT-L/14@336px"):
        clip_backend.load_clip("ViT-L/14@337px", "openai", backend="openai")
    with pytest.raises(UserError, match="neither a file nor 'openai'"):
        clip_backend.load_clip("ViT-L/14@336px", "laion2b", backend="openai")
    with pytest.raises(UserError) as caught:
        clip_backend.load_clip("ViT-L/14@336px", "openai", backend="openai")
    assert os.path.join(str(tmp_path), ".cache", "clip", "ViT-L-14-336px.pt") in str(caught.value)
    assert "hw3_download.sh" in str(caught.value)
