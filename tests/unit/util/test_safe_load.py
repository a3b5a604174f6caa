"""safe_load.py: torch files load as tensors and plain containers only, on both paths (torch's weights_only, and the
restricted unpickler torch 1.12 needs), in both file formats, and through every entry point that reads one."""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hw3.util import safe_load
from hw3.util.errors import UserError, run_main

TINY_VIT = "timm:vit_tiny_patch16_224%s?img_size=32&patch_size=8&depth=1"


class MakesMarker:
    """Unpickling it calls os.mkdir(marker): the harmless stand-in for a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class LegacyVariable:
    """Unpickles as torch.Tensor() given a 5-field legacy Variable state: a full unpickle accepts it, torch's
    weights_only loader calls Tensor.set_ with 5 arguments and raises TypeError, the error the old code retried on
    without the restriction."""

    def __reduce__(self):
        return torch.Tensor, (), (torch.zeros(2), None, None, False, None)


@pytest.fixture(params=["weights_only", "restricted_unpickler"])
def path_kind(request, monkeypatch):
    if request.param == "weights_only" and not safe_load.TRUSTED_WEIGHTS_ONLY:
        pytest.skip("torch %s has no sound weights_only loader (safe_load.TRUSTED_WEIGHTS_ONLY)" % torch.__version__)
    monkeypatch.setattr(safe_load, "FORCE_RESTRICTED_UNPICKLER", request.param == "restricted_unpickler")
    return request.param


def save(obj, path, zip_format: bool = True, **kwargs) -> str:
    torch.save(obj, str(path), _use_new_zipfile_serialization=zip_format, **kwargs)
    return str(path)


def full_unpickle(path: str):
    """What torch.load does without any restriction (the old code's fallback)."""
    return torch.load(path, map_location="cpu", **({"weights_only": False} if safe_load.HAS_WEIGHTS_ONLY else {}))


def assert_one_line(message: str, path: str, *parts: str) -> None:
    assert "\n" not in message and path in message, message
    for part in parts:
        assert part in message, message


def assert_equal(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    else:
        assert a == b


def good_state() -> dict:
    base = torch.arange(12, dtype=torch.float32).view(3, 4)
    weights = collections.OrderedDict([("fp16", torch.randn(3, 5).half()), ("fp32", torch.randn(4)),
                                       ("int", torch.arange(6).view(2, 3)), ("bool", torch.tensor([True, False])),
                                       ("view", base.t()), ("row", base[1]), ("base", base)])
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}, 1: {"step": 7}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0, 1], "foreach": None,
                                   "amsgrad": False}]}
    return dict(weights=weights, optimizer=optimizer, shape=torch.Size([2, 3]), dtype=torch.float16,
                device=torch.device("cpu"), name="run", numbers=[1, 2.5, -3], nothing=None, raw=b"\x00\xff",
                pair=(1, "a"), ints={3, 4}, parameter=torch.nn.Parameter(torch.ones(2)))


# ----------------------------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_in_a_file_is_refused_without_running(tmp_path, path_kind, zip_format):
    marker = str(tmp_path / "MARKER")
    path = save({"w": torch.ones(2), "payload": MakesMarker(marker)}, tmp_path / "evil.pt", zip_format)
    with pytest.raises(UserError) as info:
        safe_load.load(path, "decoder weights")
    assert_one_line(str(info.value), path, "decoder weights", safe_load.REFUSED, "mkdir")
    assert not os.path.exists(marker)
    full_unpickle(path)  # the control: the file does run code when fully unpickled
    assert os.path.isdir(marker)


def test_code_in_a_protocol_4_file_is_refused(tmp_path, path_kind):
    """torch.save's default is protocol 2; protocol 4 (framing, STACK_GLOBAL, memoize) is refused too (torch's
    weights_only loader refuses even the framing, so there it is a read error)."""
    marker = str(tmp_path / "MARKER")
    path = save([torch.ones(1), MakesMarker(marker)], tmp_path / "evil4.pt", pickle_protocol=4)
    with pytest.raises(UserError, match="refused" if path_kind == "restricted_unpickler" else "evil4.pt"):
        safe_load.load(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_type_error_is_not_retried_without_the_restriction(tmp_path, path_kind, zip_format):
    marker = str(tmp_path / "MARKER")
    path = save([LegacyVariable(), MakesMarker(marker)], tmp_path / "typeerror.pt", zip_format)
    with pytest.raises(TypeError):  # what made the old code retry: torch.load(..., weights_only=True) raising it
        torch.load(path, map_location="cpu", weights_only=True)
    with pytest.raises(UserError) as info:
        safe_load.load(path, "checkpoint")
    assert_one_line(str(info.value), path, "checkpoint")
    assert not os.path.exists(marker)
    full_unpickle(path)  # the control: a full unpickle gets past the TypeError's cause and runs the payload
    assert os.path.isdir(marker)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_good_files_load_equal(tmp_path, path_kind, zip_format):
    state = good_state()
    loaded = safe_load.load(save(state, tmp_path / "good.pt", zip_format), "training state")
    assert_equal(loaded, state)
    assert isinstance(loaded["parameter"], torch.nn.Parameter)
    assert loaded["weights"]["row"].data_ptr() == loaded["weights"]["base"][1].data_ptr()  # views stay views
    if path_kind == "restricted_unpickler":  # torch's weights_only loader knows protocol 2 only
        assert_equal(safe_load.load(save(state, tmp_path / "good4.pt", zip_format, pickle_protocol=4)), state)


def test_unreadable_and_missing_files(tmp_path, path_kind):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"^cannot read checkpoint .*junk\.pt: "):
        safe_load.load(str(junk), "checkpoint")
    with pytest.raises(UserError, match=r"checkpoint not found: .*nothing\.pt"):
        safe_load.load(str(tmp_path / "nothing.pt"), "checkpoint")


def test_torchscript_archive_is_refused(tmp_path, path_kind):
    path = str(tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UserError) as info:
        safe_load.load(path, "weights")
    assert_one_line(str(info.value), path, safe_load.REFUSED)


def test_load_tensors_wants_a_flat_state_dict(tmp_path, path_kind):
    from safetensors.torch import save_file

    flat = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    assert_equal(safe_load.load_tensors(save(flat, tmp_path / "flat.pt")), flat)
    save_file(flat, str(tmp_path / "flat.safetensors"))
    assert_equal(dict(sorted(safe_load.load_tensors(str(tmp_path / "flat.safetensors")).items())), flat)
    wrapped = save({"state_dict": flat, "epoch": 3}, tmp_path / "wrapped.pt")
    assert_equal(safe_load.load_tensors(wrapped, unwrap=("state_dict",)), flat)
    with pytest.raises(UserError, match=r"encoder weights .*wrapped\.pt is not a flat dict"):
        safe_load.load_tensors(wrapped, "encoder weights")
    with pytest.raises(UserError, match="not a flat dict"):
        safe_load.load_tensors(save([torch.ones(1)], tmp_path / "list.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match=r"cannot read weight file .*bad\.safetensors"):
        safe_load.load_tensors(str(tmp_path / "bad.safetensors"))


def test_restricted_torch_load_replaces_torch_load_for_a_while(tmp_path, path_kind):
    original = torch.load
    marker = str(tmp_path / "MARKER")
    evil = save({"payload": MakesMarker(marker)}, tmp_path / "evil.pt")
    good = save({"a": torch.ones(3)}, tmp_path / "good.pt")
    with pytest.raises(UserError, match="encoder weights .*evil.pt holds objects"):
        with safe_load.restricted_torch_load("encoder weights"):
            assert torch.equal(torch.load(good, map_location="cpu", weights_only=False, mmap=False)["a"], torch.ones(3))
            with open(good, "rb") as f:  # OpenAI's clip reads through an open file
                assert torch.equal(torch.load(f, map_location="cpu")["a"], torch.ones(3))
            torch.load(evil, weights_only=False)
    assert torch.load is original and not os.path.exists(marker)


def test_allowlist_mirrors_torchs_weights_only_rule():
    """Every global we admit is admitted by torch's own weights_only unpickler; what it admits beyond ours are the
    storage classes (torch.load resolves those names before asking us) and rebuild helpers for numpy and XLA."""
    unpickler = pytest.importorskip("torch._weights_only_unpickler")
    if not hasattr(unpickler, "_get_allowed_globals"):
        pytest.skip("this torch has no weights_only allowlist")
    theirs = unpickler._get_allowed_globals()
    ours = safe_load.allowed_globals()
    assert set(ours) <= set(theirs)
    assert all(ours[k] is theirs[k] for k in ours if not k.startswith("torch.") or "Storage" not in k)
    extra = sorted(k for k in set(theirs) - set(ours) if "Storage" not in k)
    assert extra == ["torch._utils._rebuild_device_tensor_from_numpy"] or set(extra) <= {
        "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_xla_tensor"}, extra


# ----------------------------------------------------------------------------------------------- entry points

@pytest.fixture(scope="module")
def tiny_gpt2_file(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_models import tiny_gpt2

    return tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "decoder_model.bin", n_layer=1, n_embd=32, n_head=1,
                     n_positions=32)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_decoder_weights_with_code_are_refused(tmp_path, path_kind, zip_format):
    from hw3.models.gpt2 import Config, Decoder, DecoderWeightsError

    marker = str(tmp_path / "MARKER")
    path = save({"wte.weight": torch.ones(4, 2), "payload": MakesMarker(marker)}, tmp_path / "decoder_model.bin",
                zip_format)
    with pytest.raises(DecoderWeightsError) as info:
        Decoder(Config(checkpoint=path))
    assert_one_line(str(info.value), path, "decoder weights", safe_load.REFUSED)
    assert not os.path.exists(marker)


def test_captioner_checkpoint_with_code_is_refused(tmp_path, path_kind, tiny_gpt2_file):
    from hw3.models.captioner import CHECKPOINT_FORMAT, load_captioner

    marker = str(tmp_path / "MARKER")
    path = save({"decoder.cross_gate": torch.zeros(1), "payload": MakesMarker(marker)}, tmp_path / "p2_best.pt")
    (tmp_path / "p2_best.json").write_text(json.dumps(dict(format=CHECKPOINT_FORMAT, encoder=TINY_VIT % "@none",
                                                           decoder={})))
    with pytest.raises(UserError) as info:
        load_captioner(path, tiny_gpt2_file)
    assert_one_line(str(info.value), path, "checkpoint", safe_load.REFUSED)
    assert not os.path.exists(marker)


def test_timm_weight_file_with_code_is_refused(tmp_path, path_kind):
    from hw3.models.encoder import ImageEncoder

    marker = str(tmp_path / "MARKER")
    path = save({"cls_token": torch.zeros(1, 1, 192), "payload": MakesMarker(marker)}, tmp_path / "vit.pt")
    with pytest.raises(UserError) as info:
        ImageEncoder(TINY_VIT % ("@" + path))
    assert_one_line(str(info.value), path, "encoder weights", safe_load.REFUSED)
    assert not os.path.exists(marker)


def test_timm_pretrained_loading_goes_through_the_safe_loader(tmp_path, path_kind):
    """timm.create_model(pretrained=True) reads its weight file itself (here a local file named by the pretrained
    config, as the hub cache would be): it too is refused, and a good one loads."""
    from hw3.models.encoder import ImageEncoder

    marker = str(tmp_path / "MARKER")
    spec = TINY_VIT % "" + "&pretrained_cfg_overlay=" + json.dumps(
        {"source": "", "hf_hub_id": "", "url": "", "custom_load": False, "file": "%s"})
    evil = save({"payload": MakesMarker(marker)}, tmp_path / "hub.pt")
    with pytest.raises(UserError) as info:
        ImageEncoder(spec % evil, offline=False)
    assert_one_line(str(info.value), evil, "encoder weights", safe_load.REFUSED)
    assert not os.path.exists(marker)
    reference = ImageEncoder(TINY_VIT % "@none").model
    good = save(reference.state_dict(), tmp_path / "hub_good.pt")
    loaded = ImageEncoder(spec % good, offline=False).model
    for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_p2_train_resume_with_code_is_refused(tmp_path, path_kind, tiny_gpt2_file, capsys):
    from hw3.training import trainer
    from hw3.training.state import STATE_FORMAT

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(str(tmp_path / "images" / "a.png"))
    coco = dict(images=[dict(id=1, file_name="a.png")], annotations=[dict(id=1, image_id=1, caption="A square.")])
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "run"
    out.mkdir()
    marker = str(tmp_path / "MARKER")
    state = save(dict(format=STATE_FORMAT, payload=MakesMarker(marker)), out / "last_state.pt")
    argv = ["--train-json", str(tmp_path / "captions.json"), "--train-images", str(tmp_path / "images"),
            "--val-json", str(tmp_path / "captions.json"), "--val-images", str(tmp_path / "images"),
            "--train-split", "all", "--val-split", "all",  # one file as both, whole on both sides
            "--decoder-weights", tiny_gpt2_file, "--encoder", TINY_VIT % "@none", "--out", str(out),
            "--workers", "0", "--device", "cpu", "--no-clipscore", "--resume"]
    with pytest.raises(SystemExit) as info:
        run_main(lambda: trainer.main(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training state ") and safe_load.REFUSED in err and state in err, err
    assert not os.path.exists(marker)
