"""transformer_decoder: the cached, reordered and repeated step interface equals full recomputation, causality, the
checkpoint and config round trips, and a tiny model that learns from scratch to read the image through
cross-attention."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hw3.models.output_vocab import IGNORE_INDEX
from hw3.data.tokenizer import END_TOKEN
from hw3.models.transformer_decoder import TransformerConfig, TransformerDecoder

OUTPUT_IDS = tuple(sorted({13, 64, 257, 262, 286, 318, 319, 290, 379, 530, 612, 734, 1115, 2068, 3290, 5044, 7586,
                           11091, 30015, END_TOKEN}))  # 20 ids, "a", "the", "of"... and the end token
UNKNOWN_IDS = (1, 50000)  # outside OUTPUT_IDS
ENCODER_DIM, N_IMAGE = 12, 5
TINY = dict(encoder_dim=ENCODER_DIM, output_ids=OUTPUT_IDS, block_size=16, n_layer=2, n_head=2, n_embd=32,
            dropout=0.0)


def tiny_model(seed: int = 0, **overrides) -> TransformerDecoder:
    torch.manual_seed(seed)
    model = TransformerDecoder(TransformerConfig(**dict(TINY, **overrides)))
    with torch.no_grad():  # LayerNorms start at identity; randomise them so equalities mean more
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def inputs(batch: int = 3, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(OUTPUT_IDS + UNKNOWN_IDS)
    tokens = ids[torch.randint(0, len(ids), (batch, length), generator=g)]
    tokens[:, 0] = END_TOKEN
    return tokens, torch.randn(batch, N_IMAGE, ENCODER_DIM, generator=g)


def close(a, b, atol=1e-5):
    return (a - b).abs().max().item() < atol


@pytest.mark.parametrize("image_proj", ["linear", "mlp"])
@torch.no_grad()
def test_cached_steps_equal_full_recomputation(image_proj):
    model = tiny_model(image_proj=image_proj)
    tokens, images = inputs()
    full = model(tokens, image_tokens=images)
    assert full.shape == (3, 9, len(OUTPUT_IDS))
    memory, cache = model.image_memory(images), model.new_cache()
    steps = [model(tokens[:, a:b], memory=memory, cache=cache) for a, b in ((0, 1), (1, 3), (3, 4), (4, 9))]
    assert cache.length == 9
    assert close(torch.cat(steps, dim=1), full)


@torch.no_grad()
def test_rows_reordered_mid_sequence_and_repeated_memory():
    model = tiny_model()
    tokens, images = inputs()
    memory, cache = model.image_memory(images), model.new_cache()
    model(tokens[:, :4], memory=memory, cache=cache)
    index = torch.tensor([2, 0, 0, 1])  # beams: rows dropped, duplicated and moved
    memory, cache = memory.index_select(index), cache.index_select(index)
    later = model(tokens[index, 4:], memory=memory, cache=cache)
    assert close(later, model(tokens[index], image_tokens=images[index])[:, 4:])

    repeated = model(tokens.repeat_interleave(2, dim=0), memory=model.image_memory(images).repeat_interleave(2))
    assert close(repeated, model(tokens, image_tokens=images).repeat_interleave(2, dim=0))


@torch.no_grad()
def test_later_tokens_never_change_earlier_logits():
    model = tiny_model()
    tokens, images = inputs()
    full = model(tokens, image_tokens=images)
    for k in (1, 4, 8):
        changed = tokens.clone()
        changed[:, k] = torch.where(tokens[:, k] == 262, torch.tensor(290), torch.tensor(262))
        other = model(changed, image_tokens=images)
        assert close(other[:, :k], full[:, :k], 1e-6)
        assert not close(other[:, k:], full[:, k:], 1e-3)


@torch.no_grad()
def test_positions_give_logits_only_there():
    model = tiny_model()
    tokens, images = inputs()
    positions = torch.zeros(tokens.shape, dtype=torch.bool)
    positions[0, :5], positions[2, 3:] = True, True
    logits = model(tokens, image_tokens=images, positions=positions)
    assert logits.shape == (int(positions.sum()), len(OUTPUT_IDS))
    assert close(logits, model(tokens, image_tokens=images)[positions])


@torch.no_grad()
def test_attention_probabilities_per_block():
    model = tiny_model()
    tokens, images = inputs()
    logits, attentions = model(tokens, image_tokens=images, return_attention=True)
    assert close(logits, model(tokens, image_tokens=images))  # the explicit softmax path equals the fused one
    assert len(attentions) == TINY["n_layer"]
    for probs in attentions:
        assert probs.shape == (3, TINY["n_head"], 9, N_IMAGE)
        assert close(probs.sum(-1), torch.ones(3, TINY["n_head"], 9))
    memory, cache = model.image_memory(images), model.new_cache()
    model(tokens[:, :6], memory=memory, cache=cache)
    _, stepped = model(tokens[:, 6:], memory=memory, cache=cache, return_attention=True)
    assert all(close(s, a[:, :, 6:]) for s, a in zip(stepped, attentions))


def test_state_dict_round_trip_is_strict():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    tokens, images = inputs()
    state = model.trainable_state_dict()
    assert set(state) == {name for name, _ in model.named_parameters()}
    other.load_trainable_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(tokens, image_tokens=images), model(tokens, image_tokens=images))
    name = "blocks.1.cross_attn.q.weight"
    with pytest.raises(ValueError, match="missing.*%s" % name):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        other.load_trainable_state_dict(dict(state, **{"extra.weight": torch.zeros(1)}))
    tiny_model(output_ids=OUTPUT_IDS[:-2] + (30016, END_TOKEN)).load_trainable_state_dict(state)  # same shapes
    smaller = tiny_model(output_ids=OUTPUT_IDS[1:])
    with pytest.raises(ValueError, match=r"wrong shape.*token_embedding.weight \(21, 32\)"):
        smaller.load_trainable_state_dict(state)


def test_config_round_trip_and_refusals():
    cfg = TransformerConfig(**TINY)
    again = TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.output_ids, tuple)
    with pytest.raises(ValueError, match="unknown transformer decoder config fields: lora_rank"):
        TransformerConfig.from_dict(dict(cfg.to_dict(), lora_rank=4))
    for field, value, message in (("n_head", 3, "n_embd 32 is not divisible by n_head 3"),
                                  ("dropout", 1.0, "dropout"), ("image_proj", "conv", "image_proj"),
                                  ("n_layer", 0, "n_layer"), ("block_size", 1, "block_size"),
                                  ("output_ids", (1, 2), "output_ids"), ("output_ids", (END_TOKEN, 5), "output_ids")):
        with pytest.raises(ValueError, match=message):
            TransformerConfig(**dict(TINY, **{field: value})).validate()
    TransformerConfig().validate()  # encoder_dim 0: not set yet, but the decoder refuses it
    with pytest.raises(ValueError, match="encoder_dim"):
        TransformerDecoder(TransformerConfig(**dict(TINY, encoder_dim=0)))


def test_every_parameter_is_trained():
    model = tiny_model(dropout=0.1).train()
    tokens, images = inputs()
    tokens[0, 3] = UNKNOWN_IDS[0]  # the unknown row is an input row too
    logits = model(tokens[:, :-1], image_tokens=images)
    targets = model.vocab.targets(tokens[:, 1:])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    summary = model.parameter_summary()
    parts = sum(v for k, v in summary.items() if k not in ("trainable", "frozen"))
    assert parts == summary["trainable"] == sum(p.numel() for p in model.parameters())
    assert summary["frozen"] == 0 and min(summary.values()) == 0 and model.merge_lora() == 0
    with torch.no_grad():  # dropout acts in training only
        assert not torch.equal(model(tokens, image_tokens=images), model(tokens, image_tokens=images))
        model.eval()
        assert torch.equal(model(tokens, image_tokens=images), model(tokens, image_tokens=images))


@torch.no_grad()
def test_unknown_ids_share_a_row_and_are_never_targets():
    model = tiny_model()
    tokens, images = inputs()
    a, b = tokens.clone(), tokens.clone()
    a[:, 2], b[:, 2] = UNKNOWN_IDS
    assert torch.equal(model(a, image_tokens=images), model(b, image_tokens=images))
    targets = model.vocab.targets(torch.tensor([UNKNOWN_IDS[0], END_TOKEN, IGNORE_INDEX, OUTPUT_IDS[0]]))
    assert targets.tolist() == [IGNORE_INDEX, len(OUTPUT_IDS) - 1, IGNORE_INDEX, 0]


def test_limits_and_missing_images():
    model = tiny_model()
    tokens, images = inputs(length=16)
    assert model.max_text_len == 16
    model(tokens, image_tokens=images)
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.cat([tokens, tokens[:, :1]], dim=1), image_tokens=images)
    with pytest.raises(ValueError, match="image_tokens or memory"):
        model(tokens)


@torch.no_grad()
def test_autocast():
    model = tiny_model()
    tokens, images = inputs()
    full = model(tokens, image_tokens=images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens, image_tokens=images)
        memory, cache = model.image_memory(images), model.new_cache()
        stepped = torch.cat([model(tokens[:, :4], memory=memory, cache=cache),
                             model(tokens[:, 4:], memory=memory, cache=cache)], dim=1)
    assert close(low.float(), full, 0.1) and close(stepped.float(), full, 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_fp16_autocast_on_cuda():
    model = tiny_model().cuda()
    tokens, images = (t.cuda() for t in inputs())
    full = model(tokens, image_tokens=images)
    with torch.autocast("cuda", dtype=torch.float16):
        low, attentions = model(tokens, image_tokens=images, return_attention=True)
    assert low.dtype == torch.float16 and close(low.float(), full, 0.05)
    assert all(torch.isfinite(a).all() for a in attentions)


# ----------------------------------------------------------------------------------------------- learning

def hot_image_task(batch: int, g: torch.Generator):
    """Four image tokens, each holding one of four codes (one-hot, repeats allowed), one of them "hot"; the caption
    (two words and the end token) names the hot token's code. Cross-attention must find the hot token and read it:
    the other tokens' codes are noise."""
    codes = torch.randint(0, 4, (batch, 4), generator=g)
    hot = torch.randint(0, 4, (batch,), generator=g)
    images = torch.randn(batch, 4, 8, generator=g) * 0.1
    images[:, :, :4] += F.one_hot(codes, 4)
    images[torch.arange(batch), hot, 4] += 3.0
    words = torch.tensor(OUTPUT_IDS[:8]).view(4, 2)
    captions = torch.cat([words[codes[torch.arange(batch), hot]], torch.full((batch, 1), END_TOKEN)], dim=1)
    return images, hot, captions  # (B, 4, 8), (B,), (B, 3)


@torch.no_grad()
def greedy(model, images, steps: int):
    memory, cache = model.image_memory(images), model.new_cache()
    seqs = torch.full((images.shape[0], 1), END_TOKEN, dtype=torch.long)
    for _ in range(steps):
        logits = model(seqs[:, -1:], memory=memory, cache=cache)[:, -1]
        seqs = torch.cat([seqs, model.vocab.ids(logits.argmax(-1)).unsqueeze(1)], dim=1)
    return seqs[:, 1:]


def test_learns_to_read_the_image_from_scratch():
    torch.manual_seed(0)
    model = TransformerDecoder(TransformerConfig(**dict(TINY, encoder_dim=8, dropout=0.0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # 100% from about 50 steps on (8 seeds)
        images, _, captions = hot_image_task(64, g)
        tokens = torch.cat([torch.full((64, 1), END_TOKEN), captions[:, :-1]], dim=1)
        logits = model(tokens, image_tokens=images)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), model.vocab.targets(captions).reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, hot, captions = hot_image_task(256, g)
    accuracy = (greedy(model, images, 3) == captions).all(1).float().mean().item()
    assert accuracy >= 0.99, (accuracy, loss.item())
    tokens = torch.cat([torch.full((256, 1), END_TOKEN), captions[:, :-1]], dim=1)
    with torch.no_grad():
        _, attentions = model(tokens, image_tokens=images, return_attention=True)
    on_hot = [a[torch.arange(256), :, 0, hot].mean(0).max().item() for a in attentions]  # best head per block
    assert max(on_hot) > 0.9, on_hot  # the first word's step looks at the hot token
