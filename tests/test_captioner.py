"""captioner.py: the encoder's tokens, the caption generator against uncached / one-by-one / Hugging Face references,
and checkpoints that rebuild the trained model."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn.functional as F

import captioner
from captioner import END_TOKEN, Captioner, ImageEncoder, generate, load_captioner, save_checkpoint
from common import UserError
from decoder import Config, Decoder

transformers = pytest.importorskip("transformers")

TINY_ENCODER = "timm:vit_tiny_patch16_224@none?img_size=32&patch_size=8&depth=2&embed_dim=32&num_heads=2"
TINY_GPT2 = dict(n_layer=2, n_embd=128, n_head=2, vocab_size=50257, n_positions=64)
HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_gpt2(seed: int = 0, end_ramp: float = 0.3, **shape):
    """A random GPT-2 whose end-token logit grows with the position, so captions end after ~10 tokens."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**dict(TINY_GPT2, **shape), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        end = model.transformer.wte.weight[END_TOKEN]
        positions = torch.arange(config.n_positions, dtype=torch.float32).unsqueeze(1)
        model.transformer.wpe.weight.add_(end_ramp * (positions - 6) * end / end.norm())
    return model


def save_course_format(model, path) -> str:
    """The course's decoder_model.bin: the transformer trunk's state dict (no `transformer.` prefix)."""
    torch.save({k: v.clone() for k, v in model.transformer.state_dict().items()}, path)
    return str(path)


def randomize_trainable(decoder: Decoder, seed: int = 0, end_push: float = 2.0) -> None:
    """Trained-looking cross-attention: open gates, weights large enough that each image changes its caption, and
    an image-dependent push along the end token's embedding so that captions end at different steps."""
    g = torch.Generator().manual_seed(seed)
    end = decoder.transformer.wte.weight[END_TOKEN].detach()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("cross_gate"):
                p.fill_(2.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() == 1 else 0.2))
        for block in decoder.transformer.h:
            direction = torch.randn(decoder.cfg.n_embd, generator=g)
            block.cross_attn.c_proj.weight.add_(end_push * torch.outer(end / end.norm(), direction / direction.norm()))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioner")
    gpt2 = tiny_gpt2()
    weights = save_course_format(gpt2, folder / "decoder_model.bin")
    model = captioner.build_captioner(TINY_ENCODER, Config(checkpoint=weights))
    randomize_trainable(model.decoder)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 32, 32, generator=g) * 0.5 + torch.randn(6, 3, 1, 1, generator=g) * 2  # distinct
    return dict(folder=folder, gpt2=gpt2, weights=weights, model=model.eval(), images=images,
                feats=model.encode(images))


# ----------------------------------------------------------------------------------------------- encoder

def test_timm_encoder_gives_all_tokens(world):
    encoder = world["model"].encoder
    assert (encoder.width, encoder.num_prefix_tokens, encoder.grid_size) == (32, 1, (4, 4))
    feats = encoder(world["images"])
    assert feats.shape == (6, 1 + 4 * 4, 32)
    assert torch.equal(feats, encoder.model.forward_features(world["images"]))
    assert not any(p.requires_grad for p in encoder.parameters())
    world["model"].train()
    assert not encoder.training and world["model"].decoder.training
    world["model"].eval()


def test_random_encoder_is_reproducible(world):
    again = ImageEncoder(TINY_ENCODER)
    assert torch.equal(again(world["images"]), world["feats"])


def test_encoder_transform_matches_input_size(world):
    from PIL import Image

    pixels = world["model"].encoder.transform(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert pixels.shape == (3, 32, 32)


def test_open_clip_encoder_tokens_match_open_clip(tmp_path):
    """All tokens after ln_post: the CLS token projected is open_clip's image embedding, the rest its patch tokens."""
    config = os.path.join(os.path.dirname(HERE), "miniworld", "models", "tiny_clip.json")
    if not os.path.isfile(config):
        pytest.skip("miniworld tiny CLIP config not present")
    encoder = ImageEncoder("open_clip:%s@none" % config)
    visual = encoder.model
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = encoder(images)
        pooled = visual(images)
        visual.output_tokens = True
        _, patches = visual(images)
        visual.output_tokens = False
    h, w = encoder.grid_size
    assert tokens.shape == (2, 1 + h * w, encoder.width)
    assert torch.allclose(tokens[:, 1:], patches, atol=1e-5)
    assert torch.allclose(tokens[:, 0] @ visual.proj, pooled, atol=1e-5)


def test_spec_parsing():
    assert captioner.parse_encoder_spec("timm:vit_x.tag@none?img_size=32&flag=true&name=ab") == (
        "timm", "vit_x.tag", "none", dict(img_size=32, flag=True, name="ab"))
    assert captioner.parse_encoder_spec("open_clip:/a/b.json@/c/d@e.pt") == ("open_clip", "/a/b.json@/c/d", "e.pt", {})
    assert captioner.parse_encoder_spec(captioner.DEFAULT_ENCODER)[2] is None
    for bad in ("vit_x", "keras:vit", "timm:", "timm:vit?img_size"):
        with pytest.raises(UserError):
            captioner.parse_encoder_spec(bad)


def test_default_encoder_is_a_timm_pretrained_name():
    import timm

    name = captioner.parse_encoder_spec(captioner.DEFAULT_ENCODER)[1]
    assert name in timm.list_pretrained(name.split(".")[0] + ".*")


def test_missing_pretrained_weights_fail_fast_offline():
    start = time.time()
    with pytest.raises(UserError, match="hw3_download.sh"):
        ImageEncoder(captioner.DEFAULT_ENCODER, offline=True)
    assert time.time() - start < 1.0
    with pytest.raises(UserError, match="not found"):
        ImageEncoder("timm:vit_tiny_patch16_224@/no/such/file.pt")
    with pytest.raises(UserError, match="unknown timm model"):
        ImageEncoder("timm:no_such_vit@none")


# ----------------------------------------------------------------------------------------------- generation references

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
        self.decoder, self.cfg, self.training = decoder, decoder.cfg, False

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


def test_captioner_forward_accepts_images_or_tokens(world):
    model, tokens = world["model"], torch.tensor([[END_TOKEN, 64, 9592]] * 6)
    with torch.no_grad():
        assert torch.equal(model(world["images"], tokens), model(world["feats"], tokens))


def test_decode_captions_strips():
    from tokenizer import BPETokenizer

    tok = BPETokenizer()
    assert captioner.decode_captions([tok.encode(" a dog on grass ")], tok) == ["a dog on grass"]


# ----------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_holds_only_trainable_tensors_and_rebuilds_the_model(world, tmp_path):
    model = world["model"]
    path = str(tmp_path / "p2_best.pt")
    save_checkpoint(path, model, extra=dict(epoch=3))
    state = torch.load(path, map_location="cpu")
    trainable = {n: p for n, p in model.decoder.named_parameters() if p.requires_grad}
    assert set(state) == set(trainable)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = json.load(open(str(tmp_path / "p2_best.json")))
    assert meta["encoder"] == TINY_ENCODER and meta["epoch"] == 3 and "checkpoint" not in meta["decoder"]
    loaded, _ = load_captioner(path, world["weights"])
    settings = dict(method="beam", beam_size=3, max_len=16)
    assert loaded.generate(world["images"], **settings) == model.generate(world["images"], **settings)


def test_checkpoint_errors_name_the_file(world, tmp_path):
    model = world["model"]
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_captioner(path, world["weights"])
    save_checkpoint(path, model)
    with pytest.raises(UserError, match="decoder_model_missing.bin"):
        load_captioner(path, str(tmp_path / "decoder_model_missing.bin"))
    other = save_course_format(tiny_gpt2(n_embd=64, n_head=1), tmp_path / "small_gpt2.bin")
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


def test_timm_loads_an_open_clip_checkpoint_file_like_open_clip(tmp_path):
    """The real loading path offline: an open_clip CLIP checkpoint file read by timm (NAME@FILE) gives the same tokens
    as the open_clip visual tower read from the same file."""
    import clip_utils

    config = str(tmp_path / "tiny_clip.json")
    with open(config, "w") as f:
        json.dump({"embed_dim": 64, "vision_cfg": {"image_size": 96, "layers": 4, "width": 128, "head_width": 64,
                                                   "patch_size": 16},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}, f)

    clip, _, _ = clip_utils.load_clip(config, None)
    weights = str(tmp_path / "open_clip_pytorch_model.bin")
    torch.save(clip.state_dict(), weights)
    by_open_clip = ImageEncoder("open_clip:%s@%s" % (config, weights))
    by_timm = ImageEncoder("timm:vit_base_patch16_clip_224@%s?img_size=96&embed_dim=128&depth=4&num_heads=2" % weights)
    assert (by_timm.width, by_timm.grid_size) == (by_open_clip.width, by_open_clip.grid_size)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(by_timm(images), by_open_clip(images), atol=1e-4)


def test_timm_file_missing_tensors_is_refused(tmp_path):
    """A local timm weight file that lacks tensors (here the last block) is refused with one error naming the file
    and what is missing; timm's own pretrained loader would have left that block random without a word."""
    spec = "timm:vit_base_patch16_clip_224@%s?img_size=32&patch_size=8&embed_dim=64&depth=2&num_heads=2"
    model = ImageEncoder(spec % "none").model
    whole, partial = str(tmp_path / "whole.pt"), str(tmp_path / "partial.pt")
    torch.save(model.state_dict(), whole)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}, partial)
    loaded = ImageEncoder(spec % whole)
    for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match=r"partial\.pt do not fit timm .*missing \['blocks\.1\."):
        ImageEncoder(spec % partial)


def test_random_open_clip_encoder_rebuilds_the_same_weights(tmp_path):
    """`open_clip:CONFIG@none` is seeded like `timm:...@none`: a saved spec rebuilds the same random tower."""
    config = tmp_path / "tiny_clip.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                                  "patch_size": 8},
                                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                               "layers": 1}}))
    spec = "open_clip:%s@none" % config
    torch.manual_seed(123)
    first = captioner.ImageEncoder(spec)
    torch.manual_seed(456)
    second = captioner.ImageEncoder(spec)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_saved_relative_paths_resolve_from_the_repository(tmp_path, monkeypatch):
    root = os.path.dirname(os.path.abspath(captioner.__file__))
    spec = "open_clip:miniworld/models/tiny_clip.json@miniworld/models/tiny_clip.pt"
    monkeypatch.chdir(tmp_path)
    assert captioner.repo_relative(spec) == "open_clip:%s@%s" % (
        os.path.join(root, "miniworld/models/tiny_clip.json"), os.path.join(root, "miniworld/models/tiny_clip.pt"))
    assert captioner.repo_relative("timm:vit_tiny_patch16_224@none?img_size=32") == "timm:vit_tiny_patch16_224@none?img_size=32"
    (tmp_path / "here.pt").write_bytes(b"")
    assert captioner.repo_relative("timm:vit_x@here.pt") == "timm:vit_x@here.pt"  # the working folder wins
