"""search: cached, batched greedy and beam search equal full recomputation one image at a time and, on text-only
GPT-2, Hugging Face's generate; the attention replay follows the generation steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoder import Config, Decoder
from search import decode_captions, generate
from tokenizer import END_TOKEN

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(captioning_world):
    return captioning_world


def ban_repeats(logp: torch.Tensor, seq, n: int) -> torch.Tensor:
    if n <= 0:
        return logp
    tail = tuple(seq[len(seq) - n + 1:]) if n > 1 else ()
    for i in range(len(seq) - n + 1):
        if tuple(seq[i:i + n - 1]) == tail:
            logp[seq[i + n - 1]] = float("-inf")
    return logp


def reference_greedy(decoder, feats, max_len: int, no_repeat_ngram: int):
    """One image at a time, the whole sequence recomputed at every step (no cache, no memory)."""
    out = []
    for i in range(feats.shape[0]):
        seq = [END_TOKEN]
        for _ in range(max_len):
            logits = decoder(torch.tensor([seq]), image_tokens=feats[i:i + 1])[0, -1]
            token = int(ban_repeats(F.log_softmax(logits.float(), -1), seq, no_repeat_ngram).argmax())
            if token == END_TOKEN:
                break
            seq.append(token)
        out.append(seq[1:])
    return out


class Uncached:
    """The decoder's cache interface with full recomputation: the 'cache' holds the tokens so far, the 'memory' the
    raw image tokens, and every call runs the whole sequence again."""

    class Tokens:
        def __init__(self, tokens=None):
            self.tokens = tokens

        def index_select(self, index):
            return Uncached.Tokens(None if self.tokens is None else self.tokens.index_select(0, index))

        def repeat_interleave(self, k):
            return Uncached.Tokens(self.tokens.repeat_interleave(k, dim=0))

    def __init__(self, decoder):
        self.decoder, self.max_text_len, self.training = decoder, decoder.max_text_len, False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def image_memory(self, feats):
        return Uncached.Tokens(feats)

    def new_cache(self):
        return Uncached.Tokens()

    def __call__(self, tokens, memory, cache):
        cache.tokens = tokens if cache.tokens is None else torch.cat([cache.tokens, tokens], dim=1)
        return self.decoder(cache.tokens, image_tokens=memory.tokens)[:, -tokens.shape[1]:]


@pytest.mark.parametrize("no_repeat_ngram", [0, 2])
def test_cached_greedy_equals_uncached_one_by_one(world, no_repeat_ngram):
    decoder, feats = world["model"].decoder, world["feats"]
    ours = generate(decoder, feats, method="greedy", max_len=16, no_repeat_ngram=no_repeat_ngram)
    with torch.no_grad():
        assert ours == reference_greedy(decoder, feats, 16, no_repeat_ngram)
    assert len({tuple(c) for c in ours}) > 1, "captions should depend on the image"
    assert len({len(c) for c in ours}) > 1, "captions should end at different steps (exercises dropping rows)"


@pytest.mark.parametrize("beam_size,length_penalty,no_repeat_ngram", [(3, 1.0, 0), (4, 0.6, 2), (2, 2.0, 3)])
def test_cached_beam_equals_uncached(world, beam_size, length_penalty, no_repeat_ngram):
    decoder, feats = world["model"].decoder, world["feats"]
    settings = dict(method="beam", beam_size=beam_size, max_len=16, length_penalty=length_penalty,
                    no_repeat_ngram=no_repeat_ngram)
    with torch.no_grad():
        assert generate(decoder, feats, **settings) == generate(Uncached(decoder), feats, **settings)


@pytest.mark.parametrize("no_repeat_ngram", [0, 2])
def test_beam_size_one_equals_greedy(world, no_repeat_ngram):
    decoder, feats = world["model"].decoder, world["feats"]
    for max_len in (4, 16):
        greedy = generate(decoder, feats, method="greedy", max_len=max_len, no_repeat_ngram=no_repeat_ngram)
        beam = generate(decoder, feats, method="beam", beam_size=1, max_len=max_len, no_repeat_ngram=no_repeat_ngram)
        assert beam == greedy


@pytest.mark.parametrize("method,beam_size", [("greedy", 1), ("beam", 3)])
def test_batch_equals_one_by_one(world, method, beam_size):
    decoder, feats = world["model"].decoder, world["feats"]
    settings = dict(method=method, beam_size=beam_size, max_len=16, no_repeat_ngram=2)
    batched = generate(decoder, feats, **settings)
    single = [generate(decoder, feats[i:i + 1], **settings)[0] for i in range(feats.shape[0])]
    assert batched == single


def _version(text: str):
    return tuple(int(part) for part in text.split(".")[:2])


@pytest.mark.parametrize("beam_size,length_penalty,no_repeat_ngram,max_len",
                         [(1, 1.0, 0, 12), (3, 1.0, 0, 12), (4, 0.5, 2, 12), (3, 2.0, 3, 20), (5, 1.0, 0, 5)])
def test_text_only_decoding_equals_hugging_face_generate(world, beam_size, length_penalty, no_repeat_ngram, max_len):
    """With closed gates the decoder is exactly GPT-2, so our search must pick what transformers' generate picks."""
    import transformers

    if beam_size > 1 and _version(transformers.__version__) < (4, 50):
        pytest.skip("transformers %s predates its vectorised beam search (4.50, PR 35802), whose stopping rule ours "
                    "follows; the older one also counts finished candidates in its best-possible score"
                    % transformers.__version__)
    decoder = Decoder(Config(checkpoint=world["weights"], encoder_dim=32)).eval()
    feats = world["feats"][:1]
    method = "greedy" if beam_size == 1 else "beam"
    ours = generate(decoder, feats, method=method, beam_size=beam_size, max_len=max_len,
                    length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)[0]
    with torch.no_grad():
        hf = world["gpt2"].generate(torch.tensor([[END_TOKEN]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                                    do_sample=False, num_beams=beam_size, max_new_tokens=max_len,
                                    length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram,
                                    early_stopping=False, eos_token_id=END_TOKEN, pad_token_id=END_TOKEN)[0, 1:]
    hf = hf.tolist()
    while hf and hf[-1] == END_TOKEN:
        hf.pop()
    assert ours == hf


def test_return_attention_follows_the_generation_steps(world):
    decoder, feats = world["model"].decoder, world["feats"]
    ids, attentions = generate(decoder, feats, method="greedy", max_len=16, return_attention=True)
    for i, (seq, blocks) in enumerate(zip(ids, attentions)):
        assert len(blocks) == decoder.cfg.n_layer
        steps = len(seq) + (1 if len(seq) < 16 else 0)
        # reference: the cached step-by-step run, asking each step for its attention
        cache, memory, tokens = decoder.new_cache(), decoder.image_memory(feats[i:i + 1]), [END_TOKEN] + seq
        with torch.no_grad():
            for step in range(steps):
                _, step_attention = decoder(torch.tensor([[tokens[step]]]), memory=memory, cache=cache,
                                            return_attention=True)
                for block, probs in zip(blocks, step_attention):
                    assert block.shape == (decoder.cfg.n_head, steps, feats.shape[1])
                    assert torch.allclose(block[:, step], probs[0, :, 0], atol=1e-5)
        assert torch.allclose(blocks[-1].sum(-1), torch.ones(decoder.cfg.n_head, steps), atol=1e-5)


def test_generate_restores_training_mode(world):
    model = world["model"].train()
    model.generate(world["images"][:1], method="greedy", max_len=3)
    assert model.decoder.training
    model.eval()


def test_decode_captions_strips():
    from tokenizer import BPETokenizer

    tok = BPETokenizer()
    assert decode_captions([tok.encode(" a dog on grass ")], tok) == ["a dog on grass"]
