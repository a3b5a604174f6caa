"""search: cached, batched greedy and beam search equal full recomputation one image at a time and, on text-only
GPT-2, Hugging Face's generate (min_len as its min_new_tokens); the minimum length keeps captions from being empty; the
attention replay follows the generation steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hw3.models.gpt2 import Config, Decoder
from hw3.util.errors import UserError
from hw3.models.decoding import DATA_LENGTH_KEY, DECODE_DEFAULTS, DecodingSettings, resolve_decoding
from hw3.models.search import decode_captions, generate
from tiny_models import Uncached, ending_gpt2, save_course_format
from hw3.data.tokenizer import END_TOKEN

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


@pytest.mark.parametrize("no_repeat_ngram,min_len", [(0, 1), (2, 0), (2, 5)])
def test_cached_greedy_equals_uncached_one_by_one(world, no_repeat_ngram, min_len):
    decoder, feats = world["model"].decoder, world["feats"]
    ours = generate(decoder, feats,
                    DecodingSettings(method="greedy", max_len=16, min_len=min_len, no_repeat_ngram=no_repeat_ngram))
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
        assert generate(decoder, feats, DecodingSettings(**settings)) == generate(Uncached(decoder), feats,
                                                                                  DecodingSettings(**settings))


@pytest.mark.parametrize("no_repeat_ngram,min_len", [(0, 1), (2, 0), (2, 3)])
def test_beam_size_one_equals_greedy(world, no_repeat_ngram, min_len):
    decoder, feats = world["model"].decoder, world["feats"]
    for max_len in (4, 16):
        settings = dict(max_len=max_len, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
        assert generate(decoder, feats, DecodingSettings(method="beam", beam_size=1, **settings)) == \
            generate(decoder, feats, DecodingSettings(method="greedy", **settings))


@pytest.mark.parametrize("method,beam_size", [("greedy", 1), ("beam", 3)])
def test_batch_equals_one_by_one(world, method, beam_size):
    decoder, feats = world["model"].decoder, world["feats"]
    settings = dict(method=method, beam_size=beam_size, max_len=16, no_repeat_ngram=2)
    batched = generate(decoder, feats, DecodingSettings(**settings))
    single = [generate(decoder, feats[i:i + 1], DecodingSettings(**settings))[0] for i in range(feats.shape[0])]
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
    ours = generate(decoder, world["feats"][:1],
                    DecodingSettings(method=method, beam_size=beam_size, max_len=max_len, min_len=min_len,
                                     length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram))[0]
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
    assert generate(decoder, feats, DecodingSettings(method=method, max_len=8, min_len=0)) == [[]] * len(feats)
    assert all(len(ids) == 1 for ids in generate(decoder, feats,
                                                 DecodingSettings(method=method, max_len=8)))  # the default, 1
    assert all(len(ids) == 3 for ids in generate(decoder, feats, DecodingSettings(method=method, max_len=8, min_len=3)))
    assert all(len(ids) == 8 for ids in generate(decoder, feats, DecodingSettings(method=method, max_len=8, min_len=8)))


@pytest.mark.parametrize("beam_size,min_len", [(1, 0), (1, 1), (1, 3), (3, 0), (3, 1), (3, 3)])
def test_min_len_equals_hugging_face_min_new_tokens(world, eager_end, beam_size, min_len):
    skip_old_hf_beam(beam_size)
    gpt2, decoder = eager_end
    method = "greedy" if beam_size == 1 else "beam"
    ours = generate(decoder, world["feats"][:1],
                    DecodingSettings(method=method, beam_size=beam_size, max_len=8, min_len=min_len,
                                     no_repeat_ngram=0))[0]
    assert ours == hugging_face_generate(gpt2, beam_size, 8, min_len)


def test_checkpoints_from_before_min_len_take_its_default():
    """Every checkpoint shipped before min_len existed still loads, and decodes with min_len 1."""
    before = dict(method="greedy", beam_size=1, max_len=20, length_penalty=1.0, no_repeat_ngram=2)
    old = dict(before, chosen_on="val")
    settings, said = resolve_decoding({}, {"inference": old}, "ckpt/p2_best.json")
    assert settings.as_record() == dict(before, min_len=1) and DECODE_DEFAULTS["min_len"] == 1
    assert "min_len=1" in said and "min_len: the README default (not in the checkpoint)" in said
    assert "the rest from p2_best.json (chosen on val)" in said
    settings, said = resolve_decoding({"min_len": 0}, {"inference": old}, "ckpt/p2_best.json")
    assert settings.min_len == 0 and "from the command line: min_len" in said and "not in the" not in said
    settings, said = resolve_decoding({}, {"inference": dict(old, min_len=3)}, "ckpt/p2_best.json")
    assert settings.min_len == 3 and "all from p2_best.json" in said
    with pytest.raises(UserError, match="min-len 21 exceeds max-len 20"):
        resolve_decoding({"min_len": 21}, {"inference": old}, "ckpt/p2_best.json")
    with pytest.raises(UserError, match="p2_best.json.*min-len must be >= 0"):
        resolve_decoding({}, {"inference": dict(old, min_len=-1)}, "ckpt/p2_best.json")


def test_return_attention_follows_the_generation_steps(world):
    decoder, feats = world["model"].decoder, world["feats"]
    ids, attentions = generate(decoder, feats, DecodingSettings(method="greedy", max_len=16), return_attention=True)
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
    model.generate(world["images"][:1], DecodingSettings(method="greedy", max_len=3))
    assert model.decoder.training
    model.eval()


def test_decode_captions_strips():
    from hw3.data.tokenizer import BPETokenizer

    tok = BPETokenizer()
    assert decode_captions([tok.encode(" a dog on grass ")], tok) == ["a dog on grass"]


# ----------------------------------------------------------------------------------------------- sampling

KEYS = ["img%d" % i for i in range(6)]


@pytest.mark.parametrize("warp", [dict(top_k=1), dict(temperature=1e-6), dict(top_p=1e-6),
                                  dict(temperature=1e-30, top_k=5, top_p=0.5)])
@pytest.mark.parametrize("no_repeat_ngram,min_len", [(0, 1), (2, 3)])
def test_sampling_that_keeps_only_the_best_token_equals_greedy(world, warp, no_repeat_ngram, min_len):
    decoder, feats = world["model"].decoder, world["feats"]
    settings = dict(max_len=16, min_len=min_len, no_repeat_ngram=no_repeat_ngram)
    greedy = generate(decoder, feats, DecodingSettings(method="greedy", **settings))
    for seed in (0, 1):
        assert generate(decoder, feats,
                        DecodingSettings(method="sample", seed=seed, **dict(settings, **warp))) == greedy


SAMPLED = dict(method="sample", max_len=16, no_repeat_ngram=2, temperature=1.5, top_k=10, top_p=0.95)


def test_same_seed_same_captions_whatever_the_batch_size(world):
    decoder, feats = world["model"].decoder, world["feats"]
    whole = generate(decoder, feats, DecodingSettings(**SAMPLED), image_keys=KEYS)
    assert len({tuple(c) for c in whole}) == len(whole) and len({len(c) for c in whole}) > 1
    for size in (1, 2, 5):
        chunks = [generate(decoder, feats[i:i + size], DecodingSettings(**SAMPLED), image_keys=KEYS[i:i + size])
                  for i in range(0, len(KEYS), size)]
        assert [ids for chunk in chunks for ids in chunk] == whole, size
    reordered = generate(decoder, feats.flip(0), DecodingSettings(**SAMPLED), image_keys=KEYS[::-1])
    assert reordered[::-1] == whole  # the key, not the place, seeds an image's draws


def test_different_seeds_give_different_captions(world):
    decoder, feats = world["model"].decoder, world["feats"]
    first = generate(decoder, feats, DecodingSettings(**SAMPLED), image_keys=KEYS)
    assert generate(decoder, feats, DecodingSettings(**SAMPLED), image_keys=KEYS) == first
    for seed in (1, 2):
        other = generate(decoder, feats, DecodingSettings(**dict(SAMPLED, seed=seed)), image_keys=KEYS)
        assert sum(a != b for a, b in zip(first, other)) >= len(KEYS) - 1, seed


@pytest.mark.parametrize("warp,min_len", [(dict(), 1), (dict(temperature=0.7, top_k=20), 0),
                                          (dict(top_p=0.9), 4)])
def test_cached_sampling_equals_uncached(world, warp, min_len):
    decoder, feats = world["model"].decoder, world["feats"]
    settings = dict(SAMPLED, min_len=min_len, captions_per_image=2, **warp)
    with torch.no_grad():
        assert generate(decoder, feats, DecodingSettings(**settings)) == generate(Uncached(decoder), feats,
                                                                                  DecodingSettings(**settings))


def test_several_captions_per_image(world):
    """N draws per image, image-major; draw 0 is the single caption of the same seed. Beam search gives its N best
    beams, the first of them its single caption."""
    decoder, feats = world["model"].decoder, world["feats"]
    one = generate(decoder, feats, DecodingSettings(**SAMPLED), image_keys=KEYS)
    three = generate(decoder, feats, DecodingSettings(captions_per_image=3, **SAMPLED), image_keys=KEYS)
    assert len(three) == 3 * len(KEYS) and three[::3] == one
    assert all(len({tuple(c) for c in three[3 * i:3 * i + 3]}) == 3 for i in range(len(KEYS)))
    beam = dict(method="beam", beam_size=4, max_len=16, no_repeat_ngram=2)
    best = generate(decoder, feats, DecodingSettings(**beam))
    top = generate(decoder, feats, DecodingSettings(captions_per_image=3, **beam))
    assert len(top) == 3 * len(KEYS) and top[::3] == best
    assert all(len({tuple(c) for c in top[3 * i:3 * i + 3]}) == 3 for i in range(len(KEYS)))
    ids, attentions = generate(decoder, feats[:2], DecodingSettings(captions_per_image=2, **SAMPLED),
                               return_attention=True)
    assert len(ids) == len(attentions) == 4
    assert [blocks[0].shape[1] for blocks in attentions] == [len(c) + (len(c) < 16) for c in ids]
    for bad in (dict(method="greedy", captions_per_image=2), dict(beam, captions_per_image=5)):
        with pytest.raises(UserError, match="captions-per-image"):  # refused when made, before any search
            DecodingSettings(**bad)


def test_beam_captions_per_image_equal_hugging_face_num_return_sequences(world):
    skip_old_hf_beam(3)
    decoder = Decoder(Config(checkpoint=world["weights"], encoder_dim=32)).eval()
    ours = generate(decoder, world["feats"][:1],
                    DecodingSettings(method="beam", beam_size=4, max_len=12, min_len=0, no_repeat_ngram=2,
                                     captions_per_image=3))
    with torch.no_grad():
        hf = world["gpt2"].generate(torch.tensor([[END_TOKEN]]), attention_mask=torch.ones(1, 1, dtype=torch.long),
                                    do_sample=False, num_beams=4, num_return_sequences=3, max_new_tokens=12,
                                    no_repeat_ngram_size=2, early_stopping=False, eos_token_id=END_TOKEN,
                                    pad_token_id=END_TOKEN)[:, 1:].tolist()
    for row in hf:
        while row and row[-1] == END_TOKEN:
            row.pop()
    assert ours == hf


def test_min_len_holds_under_sampling(world, eager_end):
    _, decoder = eager_end
    feats = world["feats"]
    for min_len in (0, 1, 3):
        ids = generate(decoder, feats,
                       DecodingSettings(method="sample", max_len=8, min_len=min_len, no_repeat_ngram=0,
                                        captions_per_image=4, top_k=5))
        assert all(len(c) >= min_len for c in ids)
        assert min(len(c) for c in ids) == min_len  # the end token is likely: it comes as soon as it may


def reference_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T) restricted to the top k, then to the smallest most-likely set holding top_p, renormalised:
    written from the definitions, one token at a time."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept = order[:top_k] if top_k else order
    mass = sum(float(probs[i]) for i in kept)
    nucleus, held = [], 0.0
    for i in kept:
        if held >= top_p:
            break
        nucleus.append(i)
        held += float(probs[i]) / mass
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 4, 1.0), (1.0, 0, 0.7),
                                                     (1.3, 5, 0.8), (0.8, 2, 0.99)])
def test_draw_frequencies_follow_the_warped_distribution(temperature, top_k, top_p):
    """200,000 draws of a fixed distribution over 8 tokens (a fixed seed: the test cannot flake); every token's
    frequency is within 0.006 of its probability (> 5 standard deviations), and dropped tokens never come."""
    from hw3.models.search import sample_next_word

    logits = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0])
    logp = F.log_softmax(logits, -1)
    draws = 200_000
    uniform = torch.rand(draws, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = sample_next_word(logp.expand(draws, -1), uniform, temperature, top_k, top_p)
    frequencies = torch.bincount(tokens, minlength=len(logits)).double() / draws
    expected = reference_distribution(logits, temperature, top_k, top_p)
    assert (frequencies - expected).abs().max() < 0.006, (frequencies, expected)
    assert bool((frequencies[expected == 0] == 0).all())


def test_banned_tokens_are_never_drawn():
    from hw3.models.search import sample_next_word

    logp = F.log_softmax(torch.zeros(4, 6), -1)
    logp[:, :5] = float("-inf")  # as the n-gram ban and min_len leave a row: only token 5 is possible
    for uniform in (0.0, 0.5, 1 - 1e-16):
        assert sample_next_word(logp, torch.full((4,), uniform, dtype=torch.float64)).tolist() == [5] * 4


def test_draw_streams_depend_on_seed_key_and_draw():
    from hw3.models.search import draw_uniforms

    streams = draw_uniforms(0, ["a", "b"], 2, 5)
    assert streams.shape == (4, 5) and len({tuple(r.tolist()) for r in streams}) == 4
    assert torch.equal(draw_uniforms(0, ["b"], 1, 5)[0], streams[2])
    assert not torch.equal(draw_uniforms(1, ["a"], 1, 5)[0], streams[0])


def test_sampling_settings_are_resolved_validated_and_named():
    settings, said = resolve_decoding({"temperature": 0.9})  # a sampling flag alone means sampling
    assert settings.as_record() == dict(method="sample", max_len=30, min_len=1, no_repeat_ngram=3, temperature=0.9,
                                        top_k=0, top_p=1.0, seed=0)
    assert said.startswith("decoding: method=sample, max_len=30, min_len=1, no_repeat_ngram=3, temperature=0.9, "
                           "top_k=0, top_p=1.0, seed=0 (from the command line: method, temperature;")
    assert resolve_decoding({})[0].as_record() == DECODE_DEFAULTS  # the course's defaults: beam 3, no sampling settings
    assert resolve_decoding({"method": "sample", "captions_per_image": 5})[0].captions_per_image == 5
    old = dict(DECODE_DEFAULTS, chosen_on="val")  # a checkpoint from before sampling
    settings, said = resolve_decoding({"method": "sample", "seed": 3}, {"inference": old}, "p2_best.json")
    assert settings.seed == 3 and settings.top_p == 1.0
    assert "temperature, top_k, top_p: the README default (not in the checkpoint)" in said
    saved = dict(old, method="sample", temperature=0.7, top_k=40)  # a checkpoint may recommend sampling
    settings, said = resolve_decoding({}, {"inference": saved}, "p2_best.json")
    assert (settings.method, settings.temperature, settings.top_k) == ("sample", 0.7, 40)
    assert resolve_decoding({"beam_size": 5}, {"inference": saved})[0].as_record() == dict(DECODE_DEFAULTS, beam_size=5)
    for given, message in [
        ({"temperature": 0.0}, "--temperature must be > 0, got 0.0"),
        ({"temperature": -1.0}, "--temperature must be > 0"),
        ({"top_p": 0.0}, r"--top-p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
        ({"top_k": -1}, "--top-k must be >= 0, got -1"),
        ({"method": "greedy", "top_k": 5}, "--method greedy contradicts --top-k, which only sampling uses"),
        ({"method": "beam", "temperature": 0.9, "seed": 1},
         "--method beam contradicts --temperature and --seed, which only sampling uses"),
        ({"method": "sample", "beam_size": 5}, "--method sample contradicts --beam-size, which only beam search"),
        ({"beam_size": 5, "top_p": 0.9}, r"--beam-size \(beam search\) contradicts --top-p \(sampling\)"),
        ({"method": "greedy", "captions_per_image": 2}, "--captions-per-image 2: greedy search gives one"),
        ({"beam_size": 2, "captions_per_image": 3}, "--captions-per-image 3 exceeds --beam-size 2"),
        ({"method": "sample", "captions_per_image": 0}, "--captions-per-image must be >= 1"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve_decoding(given)
    with pytest.raises(UserError, match=r"p2_best.json \('inference'\): top-p must be in"):
        resolve_decoding({}, {"inference": dict(saved, top_p=2.0)}, "p2_best.json")
    with pytest.raises(UserError, match="method must be beam, greedy or sample, got 'nucleus'"):
        resolve_decoding({}, {"inference": dict(saved, method="nucleus")}, "p2_best.json")


def test_decoding_settings_that_cannot_work_are_named_with_their_origin():
    """Infinite or NaN numbers, unknown "inference" keys and lengths beyond the block size, each one line
    naming the setting and whether the flag or the checkpoint gave it."""
    meta = {"decoder": dict(block_size=64, prompt_len=0), "inference": dict(DECODE_DEFAULTS, chosen_on="val")}
    for given, message in [
        ({"temperature": float("inf")}, "decoding option: --temperature must be a finite number, got inf"),
        ({"temperature": float("nan")}, "--temperature must be a finite number, got nan"),
        ({"length_penalty": float("nan")}, "--length-penalty must be a finite number"),
        ({"top_p": float("inf")}, "--top-p must be a finite number"),
        ({"max_len": 1500}, r"--max-len \(command line\) 1500 is beyond the decoder's block size: at most 63"),
        ({"max_len": 1500, "min_len": 1500}, r"--max-len \(command line\) 1500 is beyond"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve_decoding(given, meta, "ckpt/p2_best.json")
    for saved, message in [
        (dict(length_penalty=float("nan")), r"p2_best.json \('inference'\): length-penalty must be a finite number"),
        (dict(method="sample", temperature=float("inf")), "p2_best.json .*temperature must be a finite number"),
        (dict(beam_width=4), r"p2_best.json \('inference'\): unknown setting\(s\) beam_width"),
        (dict(max_len=80), r"p2_best.json \('inference'\): max_len 80 is beyond the decoder's block size"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve_decoding({}, dict(meta, inference=dict(meta["inference"], **saved)), "ckpt/p2_best.json")
    prompted = dict(meta, decoder=dict(block_size=64, prompt_len=10))
    assert resolve_decoding({"max_len": 53}, prompted, "p2_best.json")[0].max_len == 53
    with pytest.raises(UserError, match="at most 53 tokens per caption .block_size 64, less the prompt"):
        resolve_decoding({"max_len": 54}, prompted, "p2_best.json")


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_ended_tells_the_cut_captions(world, method):
    """A caption that reaches max_len without its end token is cut: with room enough none is, with max_len 1 (the end
    token banned at the first step by min_len 1) every one is, and in between exactly those as long as max_len."""
    decoder, feats = world["model"].decoder, world["feats"]
    warp = dict(top_k=3) if method == "sample" else {}  # the likelier tokens, among them the end token
    ids, ended = generate(decoder, feats, DecodingSettings(method=method, max_len=40, **warp), return_ended=True)
    assert ids == generate(decoder, feats, DecodingSettings(method=method, max_len=40, **warp)) and all(ended)
    _, ended = generate(decoder, feats, DecodingSettings(method=method, max_len=1, **warp), return_ended=True)
    assert ended == [False] * len(feats)
    limit = sorted(len(c) for c in ids)[len(ids) // 2]  # the median length: some captions fit, some do not
    short, ended = generate(decoder, feats, DecodingSettings(method=method, max_len=limit, **warp), return_ended=True)
    assert ended == [len(c) < limit for c in short] and 0 < ended.count(False) < len(feats)
    if method == "greedy":  # the same steps, stopped sooner
        assert short == [c[:limit] for c in ids] and ended == [len(c) < limit for c in ids]


def test_ended_comes_after_the_attention(world):
    decoder, feats = world["model"].decoder, world["feats"]
    ids, attention, ended = generate(decoder, feats, DecodingSettings(method="greedy", max_len=3),
                                     return_attention=True, return_ended=True)
    assert len(attention) == len(ids) == len(ended) and ids == generate(decoder, feats,
                                                                        DecodingSettings(method="greedy", max_len=3))


def test_a_checkpoint_decodes_at_the_length_of_its_data():
    """max_len: a flag, then the checkpoint's recommendation, then its training captions' length, then 30; a length
    short enough keeps 30, and a checkpoint that records none decodes as before."""
    assert resolve_decoding({}, {})[0] == resolve_decoding({}, {"arch": "gru"})[0] == DecodingSettings()
    long_data = {DATA_LENGTH_KEY: 60}
    settings, said = resolve_decoding({}, long_data, "ckpt/best.json")
    assert settings == DecodingSettings(max_len=61)
    assert "max_len=61: covers the checkpoint's training captions (max_caption_tokens 60)" in said
    assert resolve_decoding({"max_len": 20}, long_data)[0].max_len == 20
    shipped = dict(long_data, inference=dict(DECODE_DEFAULTS, max_len=45, chosen_on="val"))
    assert resolve_decoding({}, shipped)[0].max_len == 45
    assert resolve_decoding({}, {DATA_LENGTH_KEY: 12})[0] == DecodingSettings()  # short captions: the default 30
    with pytest.raises(UserError, match="max_caption_tokens"):
        resolve_decoding({}, {DATA_LENGTH_KEY: "long"})
