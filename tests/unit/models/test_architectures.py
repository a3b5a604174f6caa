"""Every from-scratch --arch of the registry, and a toy one registered by one row, behind the one step interface
(docs/DECODERS.md): the one search gives with each decoder's cache what full recomputation gives, a beam wide enough to
keep every hypothesis equals exhaustive search, checkpoints rebuild the model that made the captions, attention maps
come out where the decoder attends, and P3 and p2_train refuse what an architecture does not have. (gpt2, which needs
GPT-2 weights, has its own tests: test_gpt2.py, test_search.py.)"""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hw3.models import captioner as captioner_lib, registry
from hw3.inference import predict
from hw3.training import cli
from hw3.training.config import TrainingConfig, to_argv
from hw3.attention import visualize
from hw3.models.decoding import DecodingSettings
from hw3.util.errors import UserError
from hw3.models.search import generate
from tiny_models import CAPTION_ENCODER, Uncached
from hw3.data.tokenizer import END_TOKEN
from toy_decoder import TOY, ToyConfig

OUTPUT_IDS = (64, 257, 262, 290, 318, 1000, 3290, 4171, 7586, END_TOKEN)  # a compact layer of ten GPT-2 ids
TINY = 16  # the tiny configs' whole-number options (widths, depths, heads) are at most this
# The registry's from-scratch rows and the toy row that the `arch` fixture registers for its tests.
ROWS = {name: row for name, row in dict(registry.ARCHITECTURES, **{TOY.name: TOY}).items() if row.from_scratch}
ARCHS = tuple(ROWS)
ATTENDING = tuple(name for name, row in ROWS.items() if row.no_attention is None)
NOT_ATTENDING = tuple(name for name, row in ROWS.items() if row.no_attention)


@pytest.fixture
def arch(request, monkeypatch):
    """The parametrised --arch name; the toy row is registered for the test's duration."""
    if request.param == TOY.name:
        monkeypatch.setitem(registry.ARCHITECTURES, TOY.name, TOY)
    return request.param


def tiny_config(arch: str, output_ids=OUTPUT_IDS):
    """The row's config at its defaults, every whole-number option at most TINY, 20 positions, no dropout."""
    row = ROWS[arch]
    cfg = row.config_class(output_ids=output_ids, block_size=20, **row.preset)
    small = {o.dest: min(getattr(cfg, o.dest), TINY) for o in row.options if o.type is int}
    return dataclasses.replace(cfg, dropout=0.0, **small)


def build(arch: str, output_ids=OUTPUT_IDS, seed: int = 0):
    """A captioner of `arch` with large random weights, so that each image gets its own, peaked distributions."""
    torch.manual_seed(seed)
    model = captioner_lib.build_captioner(CAPTION_ENCODER, tiny_config(arch, output_ids))
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0, 0.6 if p.dim() > 1 else 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(5)
    return torch.randn(5, 3, 32, 32, generator=g) * 0.5 + torch.randn(5, 3, 1, 1, generator=g) * 2


@pytest.mark.parametrize("arch", ARCHS, indirect=True)
@pytest.mark.parametrize("settings", [dict(method="greedy", no_repeat_ngram=2, min_len=2),
                                      dict(method="beam", beam_size=3, no_repeat_ngram=2, length_penalty=1.0),
                                      dict(method="sample", temperature=0.9, top_k=5, seed=3, captions_per_image=2)])
def test_cached_search_equals_full_recomputation(arch, settings, images):
    model = build(arch)
    feats = model.image_tokens(images)
    with torch.no_grad():
        cached = generate(model.decoder, feats, DecodingSettings(max_len=12, **settings))
        assert cached == generate(Uncached(model.decoder), feats, DecodingSettings(max_len=12, **settings))
    assert all(i in OUTPUT_IDS and i != END_TOKEN for ids in cached for i in ids), "GPT-2 ids of the compact layer"
    assert len({tuple(c) for c in cached}) > 1, "captions should depend on the image (and the draw)"


def exhaustive(decoder, feat, max_len: int, min_len: int):
    """Every caption of up to max_len tokens with its total log-probability (length penalty 0), best first: ended ones
    without their end token, and the max_len ones that never ended."""
    ids = decoder.vocab.output_ids.tolist()
    words = [i for i in ids if i != END_TOKEN]

    def log_probs(prefix):
        logits = decoder(torch.tensor([[END_TOKEN] + list(prefix)]), image_tokens=feat)[0, -1]
        logp = F.log_softmax(logits.float(), -1)
        if len(prefix) < min_len:
            logp[decoder.vocab.end_index] = float("-inf")
        return dict(zip(ids, logp.tolist()))

    scored = []
    for length in range(max_len + 1):
        for prefix in itertools.product(words, repeat=length):
            total = sum(log_probs(prefix[:t])[prefix[t]] for t in range(length))
            if length < max_len:
                scored.append((total + log_probs(prefix)[END_TOKEN], list(prefix)))
            elif length == max_len:
                scored.append((total, list(prefix)))
    return [caption for _, caption in sorted(scored, key=lambda s: -s[0])]


@pytest.mark.parametrize("arch", ARCHS, indirect=True)
@pytest.mark.parametrize("min_len", [0, 1])
def test_a_beam_keeping_every_hypothesis_is_exhaustive_search(arch, min_len, images):
    """Three words and the end token, three steps: a beam of 4 ** 3 never drops a hypothesis, so its best three are
    exhaustive search's best three (sum of log-probs: length penalty 0, where the stopping rule is exact)."""
    model = build(arch, output_ids=(262, 290, 318, END_TOKEN), seed=1)
    feats = model.image_tokens(images[:3])
    with torch.no_grad():
        beams = generate(model.decoder, feats,
                         DecodingSettings(method="beam", beam_size=64, max_len=3, min_len=min_len, length_penalty=0.0,
                                          no_repeat_ngram=0, captions_per_image=3))
        best = [exhaustive(model.decoder, feats[i:i + 1], 3, min_len)[:3] for i in range(3)]
    assert [beams[3 * i:3 * i + 3] for i in range(3)] == best
    assert len({tuple(map(tuple, b)) for b in best}) > 1, "the images should not share their best three captions"


@pytest.mark.parametrize("arch", ARCHS, indirect=True)
def test_checkpoint_rebuilds_the_model_and_its_captions(arch, images, tmp_path):
    model = build(arch)
    path = str(tmp_path / ("p2_%s.pt" % arch))
    captioner_lib.save_checkpoint(path, model)
    meta = json.loads((tmp_path / ("p2_%s.json" % arch)).read_text())
    assert meta["arch"] == arch and meta["decoder"]["output_ids"] == list(OUTPUT_IDS)
    assert meta["trainable_parameters"] == sum(p.numel() for p in model.decoder.parameters())
    loaded, _ = captioner_lib.load_captioner(path, "no GPT-2 needed")
    assert isinstance(loaded.decoder, type(model.decoder)) and loaded.arch == arch
    settings = dict(method="beam", beam_size=3, max_len=12)
    assert loaded.generate(images, DecodingSettings(**settings)) == model.generate(images, DecodingSettings(**settings))


def test_a_checkpoint_of_an_unknown_arch_is_refused(images, tmp_path):
    path = str(tmp_path / "p2.pt")
    captioner_lib.save_checkpoint(path, build("gru"))
    meta = json.loads((tmp_path / "p2.json").read_text())
    (tmp_path / "p2.json").write_text(json.dumps(dict(meta, arch="lstm")))
    with pytest.raises(UserError, match="unknown arch 'lstm'"):
        captioner_lib.load_captioner(path, "")
    (tmp_path / "p2.json").write_text(json.dumps(dict(meta, arch="attention-gru")))  # its config says gru
    with pytest.raises(UserError, match="says 'gru'"):
        captioner_lib.load_captioner(path, "")


@pytest.mark.parametrize("arch", ATTENDING, indirect=True)
def test_attention_maps_of_the_attending_archs(arch, images):
    model = build(arch)
    ids, attention = model.generate(images[:2], DecodingSettings(method="greedy", max_len=8), return_attention=True)
    for caption, per_block in zip(ids, attention):
        maps = model.attention_maps(per_block)  # (L, h, w) over the 4 x 4 patch grid
        assert maps.shape[1:] == (4, 4) and maps.shape[0] in (len(caption), len(caption) + 1)
        assert torch.all(maps >= 0) and torch.all(maps.flatten(1).sum(1) <= 1 + 1e-5)


@pytest.mark.parametrize("arch", NOT_ATTENDING, indirect=True)
def test_an_arch_without_attention_has_no_attention_map(arch, images, tmp_path):
    model = build(arch)
    _, attention = model.generate(images[:1], DecodingSettings(method="greedy", max_len=4), return_attention=True)
    with pytest.raises(UserError, match="--arch %s has no attention map" % arch):
        model.attention_maps(attention[0])
    path = str(tmp_path / "p2.pt")
    captioner_lib.save_checkpoint(path, model)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    with pytest.raises(UserError, match="--arch %s has no attention map" % arch) as err:
        visualize.main(["--images", str(folder), "--checkpoint", path, "--decoder", "", "--out",
                           str(tmp_path / "p3")])
    assert "\n" not in str(err.value) and not (tmp_path / "p3").exists()


def test_hw3_2_path_captions_with_a_from_scratch_checkpoint(images, tmp_path):
    """p2_inference.py (what hw3_2.sh runs) takes any architecture's checkpoint; the decoder weights go unused."""
    model = build("attention-gru")
    path = str(tmp_path / "p2_best.pt")
    captioner_lib.save_checkpoint(path, model)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((images[i].permute(1, 2, 0).clamp(-2, 2) * 60 + 128).byte().numpy()).save(
            folder / ("img%d.png" % i))
    out = tmp_path / "pred.json"
    assert predict.main([str(folder), str(out), "unused.bin", "--checkpoint", path, "--device", "cpu"]) == 0
    predictions = json.loads(out.read_text())
    assert sorted(predictions) == ["img0", "img1", "img2"] and all(isinstance(c, str) for c in predictions.values())


def _options(*extra):
    return cli.parse_args(["--train-json", "t.json", "--train-images", "i", "--val-json", "v.json",
                            "--val-images", "i"] + list(extra))


@pytest.mark.parametrize("extra,message", [
    (("--arch", "gru", "--peft", "lora"), r"--arch gru does not use --peft \(gpt2\)"),
    (("--arch", "gru", "--attention-reg", "0"), r"does not use --attention-reg \(attention-gru\)"),
    (("--arch", "gpt2", "--decoder-weights", "d.bin", "--hidden-dim", "8"), "--arch gpt2 does not use --hidden-dim"),
    (("--arch", "transformer", "--decoder-weights", "d.bin"), r"does not use --decoder-weights \(gpt2\)"),
    (("--arch", "gpt2",), "--arch gpt2 needs --decoder-weights"),
    (("--arch", "transformer", "--n-embd", "30", "--n-head", "4"), "--arch transformer: .*n_head"),
    (("--arch", "attention-gru", "--dropout", "1.5"), "--arch attention-gru: dropout"),
])
def test_options_of_another_architecture_are_refused(extra, message):
    with pytest.raises(UserError, match=message):
        registry.config_from_args(_options(*extra))


def test_from_scratch_config_follows_the_caption_length():
    cfg = registry.config_from_args(_options("--arch", "attention-gru", "--max-caption-tokens", "160",
                                           "--attention-reg", "0"), output_ids=OUTPUT_IDS)
    assert cfg.block_size == 162 and cfg.attention_reg == 0 and cfg.output_ids == OUTPUT_IDS
    assert registry.config_from_args(_options("--decoder-weights", "d.bin")).lora_rank > 0  # gpt2 + LoRA by default


def test_cnn_grid_tokens_feed_the_attention_gru_and_its_maps(tmp_path):
    """A timm CNN (random weights) gives grid tokens without a class token; attention-gru attends over its grid and
    the maps come out on that grid."""
    cnn = "timm:resnet10t@none"
    model = captioner_lib.build_captioner(cnn, tiny_config("attention-gru"))
    assert model.encoder.num_prefix_tokens == 0
    h, w = model.encoder.grid_size
    images = torch.randn(2, 3, *model.encoder.input_size)
    ids, attention = model.generate(images, DecodingSettings(method="beam", beam_size=2, max_len=6),
                                    return_attention=True)
    maps = model.attention_maps(attention[0])
    assert maps.shape[1:] == (h, w) and torch.allclose(maps.flatten(1).sum(1), torch.ones(len(maps)), atol=1e-5)
    path = str(tmp_path / "cnn.pt")
    captioner_lib.save_checkpoint(path, model)
    loaded, meta = captioner_lib.load_captioner(path, "")
    assert meta["encoder"]["name"] == "resnet10t" and loaded.generate(images, DecodingSettings(max_len=6)) == model.generate(images, DecodingSettings(max_len=6))


def test_one_module_and_one_row_make_an_architecture(monkeypatch, images, tmp_path):
    """The toy decoder (tests/helpers/toy_decoder.py) and its row, and nothing else: p2_train.py's --arch choice and
    its flag, the refusal of other architectures' flags and of its own under another --arch, the config built from
    its flags, checkpoints that rebuild it and the flags that rebuild its config. (Its interface: the tests above.)"""
    with pytest.raises(SystemExit):
        _options("--arch", "toy")
    monkeypatch.setitem(registry.ARCHITECTURES, TOY.name, TOY)
    args = _options("--arch", "toy", "--width", "8", "--dropout", "0.2", "--max-caption-tokens", "10")
    assert registry.config_from_args(args, OUTPUT_IDS) == ToyConfig(output_ids=OUTPUT_IDS, block_size=12, width=8,
                                                                    dropout=0.2)
    with pytest.raises(UserError, match=r"--arch gru does not use --width \(toy\)"):
        registry.config_from_args(_options("--arch", "gru", "--width", "8"))
    with pytest.raises(UserError, match=r"--arch toy does not use --hidden-dim \(gru or attention-gru\)"):
        registry.config_from_args(_options("--arch", "toy", "--hidden-dim", "8"))
    with pytest.raises(UserError, match="--arch toy: width must be >= 1"):
        registry.config_from_args(_options("--arch", "toy", "--width", "0"))

    model = build("toy")
    path = str(tmp_path / "p2_toy.pt")
    captioner_lib.save_checkpoint(path, model)
    loaded, meta = captioner_lib.load_captioner(path, "no GPT-2 needed")
    assert meta["arch"] == loaded.arch == "toy" and loaded.decoder.cfg == model.decoder.cfg
    beam = DecodingSettings(method="beam", beam_size=3, max_len=12)
    assert loaded.generate(images, beam) == model.generate(images, beam)
    flags = to_argv(TrainingConfig.from_options(registry.model_options(meta)))
    assert flags == ["--arch", "toy", "--max-caption-tokens", "18", "--width", str(TINY), "--dropout", "0.0"]
    rebuilt = registry.config_from_args(_options(*flags), OUTPUT_IDS)
    assert dataclasses.replace(rebuilt, encoder_dim=loaded.decoder.cfg.encoder_dim) == loaded.decoder.cfg
