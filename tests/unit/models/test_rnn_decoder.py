"""rnn_decoder: the step interface (cached steps, beams as reordered rows, positions) equals teacher forcing; each
arch equals its equations written out (Show-Attend-Tell's ReLU attention and f_beta gate, a GRU cell); the
doubly stochastic term by hand; strict checkpoints and configs; the compact vocabulary; and tiny models that learn a
task only attention can solve (attention-gru) and one the mean image feature solves (gru)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hw3.models.output_vocab import IGNORE_INDEX
from hw3.models.rnn_decoder import ARCHS, AttentionGRUDecoder, GRUDecoder, RNNConfig, RNNState, build_rnn_decoder
from hw3.data.tokenizer import END_TOKEN

OUTPUT_IDS = tuple(range(100, 119)) + (END_TOKEN,)  # 20 outputs; index 19 is the end token
UNKNOWN_IDS = (5000, 6000)  # GPT-2 ids outside the compact vocabulary
ENCODER_DIM, N_TOKENS = 8, 5
TINY = dict(encoder_dim=ENCODER_DIM, output_ids=OUTPUT_IDS, block_size=16, embed_dim=16, hidden_dim=24,
            attention_dim=12, dropout=0.0)


def tiny(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_rnn_decoder(RNNConfig(arch=arch, **dict(TINY, **overrides))).eval()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, N_TOKENS, ENCODER_DIM, generator=torch.Generator().manual_seed(seed))


def captions(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    """GPT-2 ids, start token first, with some ids the compact vocabulary does not hold."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(OUTPUT_IDS + UNKNOWN_IDS)
    tokens = pool[torch.randint(0, len(pool), (batch, length), generator=g)]
    tokens[:, 0] = END_TOKEN
    return tokens


# ----------------------------------------------------------------------------------------------- the step interface

@pytest.mark.parametrize("arch", ARCHS)
def test_cached_steps_equal_teacher_forcing(arch):
    decoder, image, tokens = tiny(arch), images(3), captions(3, 7)
    full = decoder(tokens, image_tokens=image)  # (3, 7, 20)
    memory, cache = decoder.image_memory(image), decoder.new_cache()
    chunks = [tokens[:, :2]] + [tokens[:, t:t + 1] for t in range(2, 7)]  # a first chunk of two, then one at a time
    stepped = torch.cat([decoder(chunk, memory=memory, cache=cache) for chunk in chunks], dim=1)
    assert cache.length == 7
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_beams_are_rows_reordered_mid_sequence(arch):
    """As search's beam search: the memory repeated per beam, then memory and cache rows reordered after two steps;
    every step's logits equal teacher forcing on the sequences the reordered rows now hold."""
    decoder, image, beams = tiny(arch), images(2), 2
    tokens = captions(4, 6)
    reorder = torch.tensor([1, 1, 3, 0])
    memory, cache = decoder.image_memory(image).repeat_interleave(beams), decoder.new_cache()
    before = torch.cat([decoder(tokens[:, t:t + 1], memory=memory, cache=cache) for t in range(2)], dim=1)
    memory, cache = memory.index_select(reorder), cache.index_select(reorder)
    after = torch.cat([decoder(tokens[:, t:t + 1], memory=memory, cache=cache) for t in range(2, 6)], dim=1)

    rows = image.repeat_interleave(beams, dim=0)  # (4, N, D): beam b of image i is row i * beams + b
    torch.testing.assert_close(before, decoder(tokens[:, :2], image_tokens=rows), rtol=0, atol=1e-5)
    replayed = torch.cat([tokens[reorder, :2], tokens[:, 2:]], dim=1)
    full = decoder(replayed, image_tokens=rows[reorder])
    torch.testing.assert_close(after, full[:, 2:], rtol=0, atol=1e-5)


def test_empty_cache_reorders():
    cache = RNNState().index_select(torch.tensor([0, 0]))
    assert cache.hidden is None and cache.length == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_positions_give_the_rows_of_the_full_logits(arch):
    decoder, image, tokens = tiny(arch), images(3), captions(3, 6)
    positions = torch.rand(3, 6, generator=torch.Generator().manual_seed(5)) > 0.4
    full, attentions = decoder(tokens, image_tokens=image, return_attention=True)
    some, some_attentions = decoder(tokens, image_tokens=image, positions=positions, return_attention=True)
    assert some.shape == (int(positions.sum()), len(OUTPUT_IDS))
    torch.testing.assert_close(some, full[positions], rtol=0, atol=1e-6)
    for a, b in zip(attentions, some_attentions):  # the attention stays (B, 1, T, N): the penalty needs all rows
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_sequences_longer_than_the_block_are_refused(arch):
    decoder, image = tiny(arch, block_size=4), images(1)
    with pytest.raises(ValueError, match="block_size 4"):
        decoder(captions(1, 5), image_tokens=image)
    memory, cache = decoder.image_memory(image), decoder.new_cache()
    decoder(captions(1, 4), memory=memory, cache=cache)
    with pytest.raises(ValueError, match="block_size 4"):
        decoder(captions(1, 1), memory=memory, cache=cache)
    assert decoder.max_text_len == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_the_image_is_required(arch):
    with pytest.raises(ValueError, match="needs the image"):
        tiny(arch)(captions(1, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_runs_under_autocast(arch):
    """Training runs the decoder under torch.autocast (float16 on CUDA); here bfloat16 on CPU, which mixes dtypes
    the same way (linear layers in low precision, embeddings and the softmax in float32)."""
    decoder, image, tokens = tiny(arch), images(2), captions(2, 5)
    reference = decoder(tokens, image_tokens=image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, attentions = decoder(tokens, image_tokens=image, return_attention=True)
        memory, cache = decoder.image_memory(image), decoder.new_cache()
        stepped = torch.cat([decoder(tokens[:, t:t + 1], memory=memory, cache=cache) for t in range(5)], dim=1)
    torch.testing.assert_close(full.float(), reference, rtol=0, atol=0.1)
    torch.testing.assert_close(stepped.float(), reference, rtol=0, atol=0.1)
    if attentions[0] is not None:
        assert attentions[0].dtype == torch.float32


# ----------------------------------------------------------------------------------------------- the equations

def gru_cell(x, h, cell_weights):
    """A GRU cell written out (torch's gate order r, z, n): the recurrence is a GRU, whatever module runs it."""
    w_ih, w_hh, b_ih, b_hh = cell_weights
    i_r, i_z, i_n = (x @ w_ih.t() + b_ih).chunk(3, dim=1)
    h_r, h_z, h_n = (h @ w_hh.t() + b_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def linear(x, layer):
    return x @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)


def embedding_rows(tokens):
    return torch.tensor([[OUTPUT_IDS.index(i) if i in OUTPUT_IDS else len(OUTPUT_IDS) for i in row]
                         for row in tokens.tolist()])


@torch.no_grad()
def test_gru_equals_its_equations():
    decoder, image, tokens = tiny("gru"), images(3), captions(3, 5)
    rnn = decoder.rnn
    weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    mean = image.mean(dim=1)  # (B, D): the global image feature
    hidden = torch.tanh(linear(mean, decoder.init_h))
    image_input = linear(mean, decoder.image_proj)  # (B, E), concatenated at every step
    embeds = decoder.embedding.weight[embedding_rows(tokens)]  # (B, T, E)
    expected = []
    for t in range(tokens.shape[1]):
        hidden = gru_cell(torch.cat([embeds[:, t], image_input], dim=1), hidden, weights)
        expected.append(linear(hidden, decoder.fc))
    logits, attentions = decoder(tokens, image_tokens=image, return_attention=True)
    torch.testing.assert_close(logits, torch.stack(expected, dim=1), rtol=0, atol=1e-5)
    assert attentions == [None]  # one block, no attention map


@torch.no_grad()
def test_attention_gru_equals_show_attend_tell():
    decoder, image, tokens = tiny("attention-gru"), images(3), captions(3, 5)
    att, cell = decoder.attention, decoder.rnn
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    hidden = torch.tanh(linear(image.mean(dim=1), decoder.init_h))
    embeds = decoder.embedding.weight[embedding_rows(tokens)]
    expected, expected_alphas = [], []
    for t in range(tokens.shape[1]):
        # e_i = w^T relu(W_enc f_i + W_dec h_{t-1}); the tutorial's ReLU, not Bahdanau's tanh
        scores = linear(F.relu(linear(image, att.encoder_att) + linear(hidden, att.decoder_att)[:, None]),
                        att.full_att)[..., 0]  # (B, N)
        alpha = scores.softmax(dim=1)
        context = (alpha[..., None] * image).sum(dim=1)  # (B, D)
        gate = torch.sigmoid(linear(hidden, decoder.f_beta))
        hidden = gru_cell(torch.cat([embeds[:, t], gate * context], dim=1), hidden, weights)
        expected.append(linear(hidden, decoder.fc))
        expected_alphas.append(alpha)
    logits, attentions = decoder(tokens, image_tokens=image, return_attention=True)
    torch.testing.assert_close(logits, torch.stack(expected, dim=1), rtol=0, atol=1e-5)
    assert len(attentions) == 1 and attentions[0].shape == (3, 1, 5, N_TOKENS)  # (B, heads, T, N)
    torch.testing.assert_close(attentions[0][:, 0], torch.stack(expected_alphas, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(3, 1, 5), rtol=0, atol=1e-6)


def test_attention_penalty_by_hand():
    decoder = tiny("attention-gru", attention_reg=0.5)
    alpha = torch.tensor([[[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]],
                          [[0.5, 0.5], [0.3, 0.7], [1.0, 0.0]]])  # (B=2, T=3, N=2)
    positions = torch.tensor([[True, True, False], [True, True, True]])  # the first caption's last step is padding
    sums = [[0.2 + 0.6, 0.8 + 0.4], [0.5 + 0.3 + 1.0, 0.5 + 0.7 + 0.0]]
    expected = 0.5 * sum((1 - s) ** 2 for row in sums for s in row) / 4
    penalty = decoder.attention_penalty([alpha.unsqueeze(1)], positions)
    assert penalty.item() == pytest.approx(expected, abs=1e-6)
    assert not hasattr(tiny("gru"), "attention_penalty")  # only attention-gru has the term


# ----------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch):
    decoder = tiny(arch, dropout=0.5).train()
    tokens = captions(4, 6)
    tokens[0, 1] = UNKNOWN_IDS[0]  # the shared unknown row is trained too
    targets = decoder.vocab.targets(torch.cat([tokens[:, 1:], torch.full((4, 1), END_TOKEN)], dim=1))
    targets[1, 4:] = IGNORE_INDEX  # padding
    positions = targets != IGNORE_INDEX
    logits, attentions = decoder(tokens, image_tokens=images(4), positions=positions, return_attention=True)
    loss = F.cross_entropy(logits, targets[positions])
    if arch == "attention-gru":
        loss = loss + decoder.attention_penalty(attentions, positions)
    loss.backward()
    dead = [name for name, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead
    assert all(p.requires_grad for p in decoder.parameters())


def test_unknown_inputs_share_a_row_and_are_never_targets():
    decoder, image = tiny("attention-gru"), images(1)
    first, second, known = (torch.tensor([[END_TOKEN, i, 100]]) for i in UNKNOWN_IDS + (101,))
    torch.testing.assert_close(decoder(first, image_tokens=image), decoder(second, image_tokens=image), rtol=0, atol=0)
    assert not torch.allclose(decoder(first, image_tokens=image), decoder(known, image_tokens=image))
    targets = decoder.vocab.targets(torch.tensor([100, 118, UNKNOWN_IDS[0], IGNORE_INDEX, END_TOKEN]))
    assert targets.tolist() == [0, 18, IGNORE_INDEX, IGNORE_INDEX, len(OUTPUT_IDS) - 1]
    assert decoder.vocab.ids(torch.arange(len(OUTPUT_IDS))).tolist() == list(OUTPUT_IDS)
    assert decoder.embedding.num_embeddings == len(OUTPUT_IDS) + 1 and decoder.fc.out_features == len(OUTPUT_IDS)


def test_full_vocabulary_without_output_ids():
    decoder = tiny("gru", output_ids=None)
    assert decoder.vocab.size == decoder.embedding.num_embeddings == decoder.fc.out_features == 50257
    assert decoder(torch.tensor([[END_TOKEN, 5000]]), image_tokens=images(1)).shape == (1, 2, 50257)


def hot_token_task(batch: int, generator: torch.Generator, permuted: bool):
    """Four image tokens; the caption is the class id of the "hot" one. permuted: every image holds each class vector
    once and a flag marks the hot token, so the mean token is the same for every image and only attention can tell
    the class; else the hot token is the only large one, which the mean image feature shows."""
    classes = torch.eye(4, ENCODER_DIM) * 3  # class c: 3 in feature c
    label = torch.randint(0, 4, (batch,), generator=generator)
    if permuted:
        order = torch.stack([torch.randperm(4, generator=generator) for _ in range(batch)])  # class at each token
        feats = classes[order]  # (B, 4, D)
        hot = (order == label[:, None]).float()  # (B, 4): the token holding the label's class
        feats[:, :, ENCODER_DIM - 1] = hot * 3  # the flag
    else:
        feats = torch.randn(batch, 4, ENCODER_DIM, generator=generator) * 0.1
        place = torch.randint(0, 4, (batch,), generator=generator)
        feats[torch.arange(batch), place] += classes[label]
    ids = torch.tensor(OUTPUT_IDS[:4])[label]
    return feats, ids


def train_and_greedy_accuracy(arch: str, permuted: bool, steps: int = 150):
    decoder = tiny(arch, embed_dim=16, hidden_dim=32, attention_dim=16).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        feats, ids = hot_token_task(64, g, permuted)
        tokens = torch.stack([torch.full_like(ids, END_TOKEN), ids], dim=1)  # [start, class id]
        targets = decoder.vocab.targets(torch.stack([ids, torch.full_like(ids, END_TOKEN)], dim=1))
        logits = decoder(tokens, image_tokens=feats)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    decoder.eval()
    feats, ids = hot_token_task(256, torch.Generator().manual_seed(8), permuted)
    with torch.no_grad():
        memory, cache = decoder.image_memory(feats), decoder.new_cache()
        word = decoder.vocab.ids(decoder(torch.full((256, 1), END_TOKEN), memory=memory, cache=cache)[:, -1].argmax(-1))
        end = decoder.vocab.ids(decoder(word[:, None], memory=memory, cache=cache)[:, -1].argmax(-1))
        _, attentions = decoder(torch.stack([torch.full_like(ids, END_TOKEN), ids], dim=1), image_tokens=feats,
                                return_attention=True)
    accuracy = ((word == ids) & (end == END_TOKEN)).float().mean().item()
    return accuracy, feats, attentions


def test_attention_gru_learns_which_token_is_hot():
    accuracy, feats, attentions = train_and_greedy_accuracy("attention-gru", permuted=True)
    assert torch.allclose(feats.mean(dim=1), feats.mean(dim=1)[:1])  # the mean image feature says nothing
    assert accuracy >= 0.98
    hot = feats[:, :, ENCODER_DIM - 1] > 0  # (B, 4)
    assert attentions[0][:, 0, 0][hot].mean() > 0.5  # the first word's step looks at the hot token (uniform: 0.25)


def test_gru_learns_the_hot_class_from_the_mean_feature():
    accuracy, _, _ = train_and_greedy_accuracy("gru", permuted=False)
    assert accuracy >= 0.98


# ----------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip(arch):
    source, target, image, tokens = tiny(arch, seed=0), tiny(arch, seed=1), images(2), captions(2, 5)
    state = source.trainable_state_dict()
    assert set(state) == {name for name, _ in source.named_parameters()}  # every parameter, no buffers
    state["fc.bias"].add_(1.0)  # a copy: the decoder does not change
    assert not torch.equal(state["fc.bias"], source.fc.bias)
    state["fc.bias"].sub_(1.0)
    target.load_trainable_state_dict(state)
    torch.testing.assert_close(target(tokens, image_tokens=image), source(tokens, image_tokens=image), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_is_strict(arch):
    decoder = tiny(arch)
    state = decoder.trainable_state_dict()
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\]"):
        decoder.load_trainable_state_dict({k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        decoder.load_trainable_state_dict(dict(state, **{"extra.weight": torch.zeros(1)}))
    wrong = dict(state, **{"fc.weight": torch.zeros(3, 3), "embedding.weight": state["embedding.weight"] + 1})
    with pytest.raises(ValueError, match=r"fc.weight \(3, 3\)"):
        decoder.load_trainable_state_dict(wrong)
    assert all(torch.equal(v, decoder.trainable_state_dict()[k]) for k, v in before.items())  # nothing was loaded
    other = [a for a in ARCHS if a != arch][0]
    with pytest.raises(ValueError, match="does not fit"):
        decoder.load_trainable_state_dict(tiny(other).trainable_state_dict())
    with pytest.raises(ValueError, match="shapes"):
        decoder.load_trainable_state_dict(tiny(arch, hidden_dim=20).trainable_state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_summary(arch):
    decoder = tiny(arch)
    summary = decoder.parameter_summary()
    total = sum(p.numel() for p in decoder.parameters())
    assert summary["trainable"] == total and summary["frozen"] == 0
    assert sum(v for k, v in summary.items() if k not in ("trainable", "frozen")) == total
    assert ("attention" in summary) == (arch == "attention-gru") and ("image_proj" in summary) == (arch == "gru")
    assert decoder.merge_lora() == 0


# ----------------------------------------------------------------------------------------------- config

def test_config_round_trip():
    cfg = RNNConfig(**dict(TINY, arch="gru", attention_reg=0.25))
    loaded = RNNConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert loaded == cfg and isinstance(loaded.output_ids, tuple)
    with pytest.raises(ValueError, match="unknown RNN decoder config fields: hidden_size"):
        RNNConfig.from_dict(dict(cfg.to_dict(), hidden_size=3))


def test_defaults_are_the_show_attend_tell_tutorials():
    cfg = RNNConfig()
    assert (cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, cfg.dropout, cfg.attention_reg) == (512, 512, 512, 0.5,
                                                                                                   1.0)


@pytest.mark.parametrize("field, value", [("arch", "lstm"), ("encoder_dim", 0), ("embed_dim", 0), ("hidden_dim", 2.5),
                                          ("attention_dim", -1), ("block_size", 1), ("dropout", 1.0),
                                          ("attention_reg", -0.1), ("output_ids", (100, 101))])
def test_validate_names_the_field(field, value):
    fields = dict(TINY, arch="gru")
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        RNNConfig(**fields).validate()


def test_a_class_builds_only_its_arch():
    with pytest.raises(ValueError, match="attention-gru"):
        GRUDecoder(RNNConfig(**dict(TINY, arch="attention-gru")))
    assert isinstance(build_rnn_decoder(RNNConfig(**dict(TINY, arch="attention-gru"))), AttentionGRUDecoder)
