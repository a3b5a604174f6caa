"""captioner: the forward training calls, attention maps on the encoder's patch grid, checkpoints that hold only
trained tensors and rebuild the model, and the errors that name the file."""
from __future__ import annotations

import json
import os

import pytest
import torch

from hw3.util import safe_load
from hw3.models.captioner import Captioner, load_captioner, save_checkpoint
from hw3.models.decoding import DecodingSettings
from hw3.util.errors import UserError
from hw3.models.gpt2 import Config, Decoder
from hw3.models.encoder import EncoderSpec
from tiny_models import CAPTION_ENCODER, ending_gpt2, save_course_format
from hw3.data.tokenizer import END_TOKEN


@pytest.fixture(scope="module")
def world(captioning_world):
    return captioning_world


def test_captioner_forward_accepts_images_or_tokens(world):
    model, tokens = world["model"], torch.tensor([[END_TOKEN, 64, 9592]] * 6)
    with torch.no_grad():
        assert torch.equal(model(world["images"], tokens), model(world["feats"], tokens))


# ----------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_holds_only_trainable_tensors_and_rebuilds_the_model(world, tmp_path):
    model = world["model"]
    path = str(tmp_path / "p2_best.pt")
    save_checkpoint(path, model, extra=dict(epoch=3))
    state = safe_load.load_tensors(path)
    trainable = {n: p for n, p in model.decoder.named_parameters() if p.requires_grad}
    assert set(state) == set(trainable)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = json.load(open(str(tmp_path / "p2_best.json")))
    assert EncoderSpec.from_json(meta["encoder"]) == EncoderSpec.parse(CAPTION_ENCODER) and meta["epoch"] == 3 and "checkpoint" not in meta["decoder"]
    loaded, _ = load_captioner(path, world["weights"])
    settings = dict(method="beam", beam_size=3, max_len=16)
    assert loaded.generate(world["images"], DecodingSettings(**settings)) == model.generate(world["images"], DecodingSettings(**settings))


def test_checkpoint_errors_name_the_file(world, tmp_path):
    model = world["model"]
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_captioner(path, world["weights"])
    save_checkpoint(path, model)
    with pytest.raises(UserError, match="decoder_model_missing.bin"):
        load_captioner(path, str(tmp_path / "decoder_model_missing.bin"))
    other = save_course_format(ending_gpt2(n_embd=64, n_head=1), tmp_path / "small_gpt2.bin")
    with pytest.raises(UserError, match="small_gpt2.bin"):
        load_captioner(path, other)
    meta = json.load(open(str(tmp_path / "ckpt.json")))
    json.dump(dict(meta, decoder=dict(meta["decoder"], adapter_dim=8)), open(str(tmp_path / "ckpt.json"), "w"))
    with pytest.raises(UserError, match=r"ckpt.pt does not match its config .*missing"):
        load_captioner(path, world["weights"])
    os.remove(str(tmp_path / "ckpt.json"))
    with pytest.raises(UserError, match="ckpt.json"):
        load_captioner(path, world["weights"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="cannot read checkpoint .*junk.pt"):
        load_captioner(str(tmp_path / "junk.pt"), world["weights"])


def test_encoder_width_mismatch_is_refused(world):
    decoder = Decoder(Config(checkpoint=world["weights"], encoder_dim=48))
    with pytest.raises(UserError, match="48"):
        Captioner(world["model"].encoder, decoder)


