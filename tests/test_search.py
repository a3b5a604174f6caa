"""search: cached, batched greedy and beam search equal full recomputation one image at a time and, on text-only
GPT-2, Hugging Face's generate (min_len as its min_new_tokens); the minimum length keeps captions from being empty; the
attention replay follows the generation steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoder import Config, Decoder
from common import UserError
from search import DECODE_DEFAULTS, decode_captions, generate, resolve_decoding
from tiny_models import ending_gpt2, save_course_format
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


def reference_greedy(decoder, feats, max_len: int, no_repeat_ngram: int, min_len: int):
    """One image at a time, the whole sequence recomputed at every step (no cache, no memory)."""
    out = []
    for i in range(feats.shape[0]):
        seq = [END_TOKEN]
        for step in range(max_len):
            logits = decoder(torch.tensor([seq]), image_tokens=feats[i:i + 1])[0, -1]
            logp = ban_repeats(F.log_softmax(logits.float(), -1), seq, no_repeat_ngram)
            if step < min_len:
                logp[END_TOKEN] = float("-inf")
            token = int(logp.argmax())
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


@pytest.mark.parametrize("no_repeat_ngram,min_len", [(0, 1), (2, 0), (2, 5)])
def test_cached_greedy_equals_uncached_one_by_one(world, no_repeat_ngram, min_len):
    decoder, feats = world["model"].decoder, world["feats"]
    ours = generate(decoder, feats, method="greedy", max_len=16, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
    with torch.no_grad():
        assert ours == reference_greedy(decoder, feats, 16, no_repeat_ngram, min_len)
    assert len({tuple(c) for c in ours}) > 1, "captions should depend on the image"
    assert len({len(c) for c in ours}) > 1, "captions should end at different steps (exercises dropping rows)"


@pytest.mark.parametrize("beam_size,length_penalty,no_repeat_ngram,min_len",
                         [(3, 1.0, 0, 1), (4, 0.6, 2, 0), (2, 2.0, 3, 6)])
def test_cached_beam_equals_uncached(world, beam_size, length_penalty, no_repeat_ngram, min_len):
    decoder, feats = world["model"].decoder, world["feats"]
    settings = dict(method="beam", beam_size=beam_size, max_len=16, min_len=min_len, length_penalty=length_penalty,
                    no_repeat_ngram=no_repeat_ngram)
    with torch.no_grad():
        assert generate(decoder, feats, **settings) == generate(Uncached(decoder), feats, **settings)


@pytest.mark.parametrize("no_repeat_ngram,min_len", [(0, 1), (2, 0), (2, 3)])
def test_beam_size_one_equals_greedy(world, no_repeat_ngram, min_len):
    decoder, feats = world["model"].decoder, world["feats"]
    for max_len in (4, 16):
        settings = dict(max_len=max_len, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
        assert generate(decoder, feats, method="beam", beam_size=1, **settings) == \
            generate(decoder, feats, method="greedy", **settings)


@pytest.mark.parametrize("method,beam_size", [("greedy", 1), ("beam", 3)])
def test_batch_equals_one_by_one(world, method, beam_size):
    decoder, feats = world["model"].decoder, world["feats"]
    settings = dict(method=method, beam_size=beam_size, max_len=16, no_repeat_ngram=2)
    batched = generate(decoder, feats, **settings)
    single = [generate(decoder, feats[i:i + 1], **settings)[0] for i in range(feats.shape[0])]
    assert batched == single


def _version(text: str):
    return tuple(int(part) for part in text.split(".")[:2])


def skip_old_hf_beam(beam_size: int) -> None:
    import transformers

    if beam_size > 1 and _version(transformers.__version__) < (4, 50):
        pytest.skip("transformers %s predates its vectorised beam search (4.50, PR 35802), whose stopping rule ours "
                    "follows; the older one also counts finished candidates in its best-possible score"
                    % transformers.__version__)


def hugging_face_generate(gpt2, beam_size: int, max_len: int, min_len: int, length_penalty: float = 1.0,
                          no_repeat_ngram: int = 0):
    """transformers' generate from the start token; min_len is its min_new_tokens (0: no minimum, not passed)."""
    minimum = dict(min_new_tokens=min_len) if min_len else {}
    with torch.no_grad():
        hf = gpt2.generate(torch.tensor([[END_TOKEN]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                           do_sample=False, num_beams=beam_size, max_new_tokens=max_len, length_penalty=length_penalty,
                           no_repeat_ngram_size=no_repeat_ngram, early_stopping=False, eos_token_id=END_TOKEN,
                           pad_token_id=END_TOKEN, **minimum)[0, 1:]
    hf = hf.tolist()
    while hf and hf[-1] == END_TOKEN:
        hf.pop()
    return hf


@pytest.mark.parametrize("beam_size,length_penalty,no_repeat_ngram,max_len,min_len",
                         [(1, 1.0, 0, 12, 0), (1, 1.0, 2, 12, 4), (3, 1.0, 0, 12, 0), (3, 1.0, 0, 12, 1),
                          (4, 0.5, 2, 12, 0), (3, 2.0, 3, 20, 4), (5, 1.0, 0, 5, 0)])
def test_text_only_decoding_equals_hugging_face_generate(world, beam_size, length_penalty, no_repeat_ngram, max_len,
                                                         min_len):
    """With closed gates the decoder is exactly GPT-2, so our search must pick what transformers' generate picks."""
    skip_old_hf_beam(beam_size)
    decoder = Decoder(Config(checkpoint=world["weights"], encoder_dim=32)).eval()
    method = "greedy" if beam_size == 1 else "beam"
    ours = generate(decoder, world["feats"][:1], method=method, beam_size=beam_size, max_len=max_len, min_len=min_len,
                    length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)[0]
    assert ours == hugging_face_generate(world["gpt2"], beam_size, max_len, min_len, length_penalty, no_repeat_ngram)


@pytest.fixture(scope="module")
def eager_end(tmp_path_factory):
    """A GPT-2 whose end token is the top choice at every position (a push along its embedding in every position
    embedding), as an untrained captioner can be: min_len is all that keeps its captions from being empty."""
    gpt2 = ending_gpt2(end_ramp=0.0)
    with torch.no_grad():
        end = gpt2.transformer.wte.weight[END_TOKEN]
        gpt2.transformer.wpe.weight.add_(3.0 * end / end.norm())
    weights = save_course_format(gpt2, tmp_path_factory.mktemp("eager_end") / "decoder_model.bin")
    return gpt2, Decoder(Config(checkpoint=weights, encoder_dim=32)).eval()


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_min_len_keeps_captions_from_being_empty(world, eager_end, method):
    gpt2, decoder = eager_end
    with torch.no_grad():
        assert int(gpt2(torch.full((1, 8), END_TOKEN)).logits[0].argmax(-1).eq(END_TOKEN).sum()) == 8
    feats = world["feats"]
    assert generate(decoder, feats, method=method, max_len=8, min_len=0) == [[]] * len(feats)
    assert all(len(ids) == 1 for ids in generate(decoder, feats, method=method, max_len=8))  # the default, 1
    assert all(len(ids) == 3 for ids in generate(decoder, feats, method=method, max_len=8, min_len=3))
    assert all(len(ids) == 8 for ids in generate(decoder, feats, method=method, max_len=8, min_len=8))


@pytest.mark.parametrize("beam_size,min_len", [(1, 0), (1, 1), (1, 3), (3, 0), (3, 1), (3, 3)])
def test_min_len_equals_hugging_face_min_new_tokens(world, eager_end, beam_size, min_len):
    skip_old_hf_beam(beam_size)
    gpt2, decoder = eager_end
    method = "greedy" if beam_size == 1 else "beam"
    ours = generate(decoder, world["feats"][:1], method=method, beam_size=beam_size, max_len=8, min_len=min_len,
                    no_repeat_ngram=0)[0]
    assert ours == hugging_face_generate(gpt2, beam_size, 8, min_len)


def test_checkpoints_from_before_min_len_take_its_default():
    """Every checkpoint shipped before min_len existed still loads, and decodes with min_len 1."""
    before = dict(method="greedy", beam_size=1, max_len=20, length_penalty=1.0, no_repeat_ngram=2)
    old = dict(before, chosen_on="val")
    settings, said = resolve_decoding({}, {"inference": old}, "ckpt/p2_best.json")
    assert settings == dict(before, min_len=1) and DECODE_DEFAULTS["min_len"] == 1
    assert "min_len=1" in said and "min_len: the README default (not in the checkpoint)" in said
    assert "the rest from p2_best.json (chosen on val)" in said
    settings, said = resolve_decoding({"min_len": 0}, {"inference": old}, "ckpt/p2_best.json")
    assert settings["min_len"] == 0 and "from the command line: min_len" in said and "not in the" not in said
    settings, said = resolve_decoding({}, {"inference": dict(old, min_len=3)}, "ckpt/p2_best.json")
    assert settings["min_len"] == 3 and "all from p2_best.json" in said
    with pytest.raises(UserError, match="min-len 21 exceeds max-len 20"):
        resolve_decoding({"min_len": 21}, {"inference": old}, "ckpt/p2_best.json")
    with pytest.raises(UserError, match="p2_best.json.*min-len must be >= 0"):
        resolve_decoding({}, {"inference": dict(old, min_len=-1)}, "ckpt/p2_best.json")


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
