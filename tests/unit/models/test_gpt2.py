"""decoder.py against transformers' GPT2LMHeadModel, and the captioning extensions against the base model."""
from __future__ import annotations

import json

import pytest
import torch

from tiny_models import save_course_format
from hw3.models.gpt2 import (LORA_TARGETS, Config, Decoder, DecoderWeightsError, KVCache, count_parameters,
                             load_gpt2_weights, peft_config)

transformers = pytest.importorskip("transformers")

TINY = dict(n_layer=2, n_embd=128, n_head=2, vocab_size=50257, n_positions=64)


def hf_model(n_layer, n_embd, n_head, vocab_size, n_positions, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                                     n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to constants; randomise them so parity means more
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = hf_model(**TINY)
    path = save_course_format(model, tmp_path_factory.mktemp("w") / "decoder_model.bin")
    return model, path


def tokens(batch=2, length=12, seed=1, vocab=50257):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_logits_equal_transformers(tmp_path, size):
    shape = TINY if size == "tiny" else dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = hf_model(**shape)
    decoder = Decoder(Config(checkpoint=save_course_format(model, tmp_path / "decoder_model.bin"))).eval()
    assert (decoder.cfg.n_layer, decoder.cfg.n_embd, decoder.cfg.n_head, decoder.cfg.block_size) == (
        shape["n_layer"], shape["n_embd"], shape["n_head"], shape["n_positions"])
    x = tokens()
    with torch.no_grad():
        diff = (decoder(x) - model(x).logits).abs().max().item()
    assert diff < 1e-4


def test_explicit_head_count(tmp_path):
    shape = dict(TINY, n_head=4)
    model = hf_model(**shape)
    decoder = Decoder(Config(checkpoint=save_course_format(model, tmp_path / "d.bin"), n_head=4)).eval()
    x = tokens()
    with torch.no_grad():
        assert (decoder(x) - model(x).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("fmt", ["pytorch_model.bin", "model.safetensors"])
def test_hugging_face_files(tmp_path, fmt):
    model = hf_model(**TINY)
    if fmt == "pytorch_model.bin":
        torch.save(model.state_dict(), tmp_path / fmt)
    else:
        model.save_pretrained(tmp_path, safe_serialization=True)
    decoder = Decoder(Config(checkpoint=str(tmp_path / fmt))).eval()
    x = tokens()
    with torch.no_grad():
        assert (decoder(x) - model(x).logits).abs().max().item() < 1e-4


def test_bad_files_name_the_file(tmp_path, tiny):
    text = tmp_path / "notes.bin"
    text.write_text("not a checkpoint")
    with pytest.raises(DecoderWeightsError, match="notes.bin"):
        Decoder(Config(checkpoint=str(text)))
    other = tmp_path / "resnet.bin"
    torch.save({"conv1.weight": torch.zeros(3)}, other)
    with pytest.raises(DecoderWeightsError, match="resnet.bin.*not a GPT-2"):
        Decoder(Config(checkpoint=str(other)))
    with pytest.raises(DecoderWeightsError, match="missing.bin"):
        Decoder(Config(checkpoint=str(tmp_path / "missing.bin")))
    state = load_gpt2_weights(tiny[1])
    del state["h.1.mlp.c_fc.bias"]
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(DecoderWeightsError, match="partial.bin.*h.1.mlp.c_fc.bias"):
        Decoder(Config(checkpoint=str(tmp_path / "partial.bin")))
    with pytest.raises(DecoderWeightsError, match="n_embd"):
        Decoder(Config(checkpoint=tiny[1], n_embd=768))


ENCODER_DIM = 48
PEFT_AT_IDENTITY = {
    "cross_only": dict(encoder_dim=ENCODER_DIM),
    "adapter": dict(encoder_dim=ENCODER_DIM, **peft_config("adapter", adapter_dim=16)),
    "lora": dict(encoder_dim=ENCODER_DIM, **peft_config("lora", lora_rank=4)),
    "all": dict(encoder_dim=ENCODER_DIM, cross_attn_layers=(1,), image_proj="mlp", adapter_dim=8, lora_rank=4,
                lora_targets=LORA_TARGETS),
}


def image_tokens(batch=2, n=7, seed=2):
    return torch.randn(batch, n, ENCODER_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(PEFT_AT_IDENTITY))
def test_starts_as_the_base_model(tiny, name):
    model, path = tiny
    decoder = Decoder(Config(checkpoint=path, **PEFT_AT_IDENTITY[name])).eval()
    x = tokens()
    with torch.no_grad():
        reference = model(x).logits
        assert (decoder(x, image_tokens=image_tokens()) - reference).abs().max().item() < 1e-4
        assert (decoder(x) - reference).abs().max().item() < 1e-4


def test_only_added_parameters_train(tiny):
    _, path = tiny
    cfg = Config(checkpoint=path, encoder_dim=ENCODER_DIM, adapter_dim=8, lora_rank=4, lora_targets=LORA_TARGETS,
                 prefix_len=3, prefix_hidden=16, prompt_len=2)
    decoder = Decoder(cfg)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    trainable = {n for n, p in decoder.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    logits = decoder(x[:, :-1], image_tokens=image_tokens())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    after = decoder.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert any("lora_" in k for k in changed) and any("adapters" in k for k in changed)
    assert any(k.startswith("prefix") for k in changed) and "prompt" in changed
    assert any("cross_gate" in k for k in changed) and any(k.startswith("image_proj") for k in changed)
    assert not any(k.endswith((".c_attn.weight", "wte.weight", "ln_1.weight")) for k in changed)


def busy_decoder(path, **extra):
    """Every extension on, with non-zero gates and adapters so that each one changes the output."""
    torch.manual_seed(3)
    cfg = dict(checkpoint=path, encoder_dim=ENCODER_DIM, adapter_dim=8, lora_rank=4, lora_dropout=0.0,
               lora_targets=LORA_TARGETS, prefix_len=3, prefix_hidden=16, prompt_len=2)
    cfg.update(extra)
    decoder = Decoder(Config(**cfg))
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if p.requires_grad and ("cross_gate" in name or ".up." in name or "lora_B" in name):
                p.normal_(0, 0.5)
    return decoder.eval()


@pytest.mark.parametrize("extra", [{}, dict(prompt_len=0, prefix_len=0), dict(cross_attn_layers=(0,))])
def test_cached_decoding_equals_recomputation(tiny, extra):
    decoder = busy_decoder(tiny[1], **extra)
    x, feats = tokens(length=9), image_tokens()
    with torch.no_grad():
        full = decoder(x, image_tokens=feats)
        memory = decoder.image_memory(feats)
        cache = decoder.new_cache()
        steps = [decoder(x[:, :3], memory=memory, cache=cache)]  # a 3-token first step, then one at a time
        steps += [decoder(x[:, t:t + 1], memory=memory, cache=cache) for t in range(3, x.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_logits_at_positions_equal_full_logits(tiny):
    """positions= (training's padding skip) returns exactly the full logits' rows at the chosen positions, prompt
    tuning included, and the loss on them equals the loss that ignores padding."""
    from hw3.training import loop

    decoder = busy_decoder(tiny[1])
    x, feats = tokens(length=9), image_tokens()
    targets = x.clone()
    targets[0, 6:] = -100
    targets[1, 2:4] = -100
    mask = targets != -100
    with torch.no_grad():
        full = decoder(x, image_tokens=feats)
        some = decoder(x, image_tokens=feats, positions=mask)
    assert some.shape == (int(mask.sum()), full.shape[-1])
    assert (some - full[mask]).abs().max().item() < 1e-5
    assert abs(float(loop.caption_loss(some, targets)) - float(loop.caption_loss(full, targets))) < 1e-5


def test_cache_reorders_for_beams(tiny):
    decoder = busy_decoder(tiny[1])
    x, feats = tokens(length=6), image_tokens()
    order = torch.tensor([1, 0, 1])
    with torch.no_grad():
        memory = decoder.image_memory(feats)
        cache = decoder.new_cache()
        decoder(x[:, :5], memory=memory, cache=cache)
        reordered = decoder(x[order, 5:], memory=memory.index_select(order), cache=cache.index_select(order))
        full = decoder(x[order], image_tokens=feats[order])
        beams = decoder.image_memory(feats).repeat_interleave(2)
        assert torch.equal(beams.layers[0][0][2], memory.layers[0][0][1])
    assert (reordered[:, -1] - full[:, -1]).abs().max().item() < 1e-4
    assert isinstance(cache.index_select(order), KVCache)


def test_attention_probabilities(tiny):
    decoder = busy_decoder(tiny[1])
    x, feats = tokens(length=5), image_tokens(n=7)
    with torch.no_grad():
        fast = decoder(x, image_tokens=feats)
        logits, attentions = decoder(x, image_tokens=feats, return_attention=True)
    assert (logits - fast).abs().max().item() < 1e-5
    assert len(attentions) == decoder.cfg.n_layer
    for probs in attentions:
        assert probs.shape == (2, decoder.cfg.n_head, 5, 7)
        assert torch.allclose(probs.sum(-1), torch.ones(2, decoder.cfg.n_head, 5), atol=1e-5)
    only_last = busy_decoder(tiny[1], cross_attn_layers=(1,))
    with torch.no_grad():
        _, attentions = only_last(x, image_tokens=feats, return_attention=True)
    assert attentions[0] is None and attentions[1] is not None


def test_lora_merges_only_when_asked_and_keeps_outputs(tiny):
    decoder = busy_decoder(tiny[1]).train()
    x, feats = tokens(), image_tokens()
    lora_layers = [m for m in decoder.modules() if hasattr(m, "lora_A")]
    assert lora_layers
    for module in decoder.modules():  # dropout-free comparison
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    frozen = [m.weight.detach().clone() for m in lora_layers]
    with torch.no_grad():
        unmerged = decoder(x, image_tokens=feats)
        decoder.eval().train().eval()  # mode switches never merge or un-merge behind our back
        assert not decoder.lora_merged and all(torch.equal(m.weight, w) for m, w in zip(lora_layers, frozen))
        assert decoder.merge_lora() == len(lora_layers) and decoder.lora_merged
        merged = decoder(x, image_tokens=feats)
        assert not all(torch.equal(m.weight, w) for m, w in zip(lora_layers, frozen))
        decoder.train().eval()  # still merged, exactly once
        assert torch.equal(decoder(x, image_tokens=feats), merged)
    assert decoder.merge_lora() == 0  # a second call does nothing
    assert (merged - unmerged).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="merged"):
        decoder.load_trainable_state_dict(decoder.trainable_state_dict())


def test_trainable_checkpoint_round_trip(tiny, tmp_path):
    path = tiny[1]
    decoder = busy_decoder(path)
    state = decoder.trainable_state_dict()
    base = set(load_gpt2_weights(path))
    assert not any(k[len("transformer."):] in base or k == "lm_head.weight" for k in state)
    assert sum(v.numel() for v in state.values()) == count_parameters(decoder)
    torch.save(state, tmp_path / "peft.pt")
    (tmp_path / "peft.json").write_text(json.dumps(decoder.cfg.to_dict()))
    fresh = Decoder(Config.from_dict(json.loads((tmp_path / "peft.json").read_text()))).eval()  # merged LoRA
    fresh.load_trainable_state_dict(torch.load(tmp_path / "peft.pt"))
    x, feats = tokens(), image_tokens()
    with torch.no_grad():
        assert (fresh(x, image_tokens=feats) - decoder(x, image_tokens=feats)).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="missing"):
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if "lora" not in k})


@pytest.mark.parametrize("encoder_dim", [1024, 1280])
def test_default_configs_fit_the_budget(encoder_dim, capsys):
    counts = {}
    for method in ("none", "adapter", "prefix", "prompt", "lora"):
        decoder = Decoder(Config(encoder_dim=encoder_dim, **peft_config(method)))  # GPT-2 small, random weights
        counts[method] = decoder.parameter_summary()
        assert counts[method]["frozen"] == 124439808  # GPT-2 small, lm_head tied to wte
    with capsys.disabled():
        print("\nencoder width %d: trainable parameters %s" % (
            encoder_dim, {m: c["trainable"] for m, c in counts.items()}))
    assert all(c["trainable"] < 35_000_000 for c in counts.values())
