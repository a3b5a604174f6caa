"""p3_visualize.py and its hook, Captioner.attention_maps: the maps drawn are the module's attention probabilities,
on the right patch grid; the output folder is complete or absent."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

import captioner
import p3_visualize as p3
import search
from common import UserError
from decoder import Config, Decoder
from encoder import ImageEncoder
from tiny_models import TINY_ENCODER, tiny_gpt2


@pytest.mark.parametrize("spec, prefix, grid", [
    ("timm:vit_tiny_patch16_224@none?depth=1&img_size=224", 1, (14, 14)),
    ("timm:vit_tiny_patch16_224@none?depth=1&img_size=256&reg_tokens=4", 5, (16, 16)),
    ("timm:vit_tiny_patch16_224@none?depth=1&img_size=[64,32]&patch_size=8", 1, (8, 4)),
])
def test_patch_grid_for_encoder_geometries(spec, prefix, grid):
    encoder = ImageEncoder(spec)
    assert (encoder.num_prefix_tokens, encoder.grid_size) == (prefix, grid)
    h, w = grid
    with torch.no_grad():
        tokens = encoder(torch.zeros((1, 3) + tuple(encoder.model.patch_embed.img_size)))
    assert tokens.shape[1] == prefix + h * w
    model = captioner.Captioner(encoder, Decoder(Config(encoder_dim=encoder.width, n_layer=1, n_embd=64,
                                                        vocab_size=8, block_size=8)))
    attention = torch.arange(prefix + h * w, dtype=torch.float).view(1, 1, -1)  # token index as its "attention"
    maps = model.attention_maps([attention])
    assert maps.shape == (1, h, w)
    for i in range(h):  # row-major patch order: patch (i, j) is token prefix + i * w + j
        for j in range(w):
            assert maps[0, i, j] == prefix + i * w + j
    with pytest.raises(ValueError, match="prefix tokens"):
        model.attention_maps([attention[:, :, 1:]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny captioner with non-zero cross-attention gates, saved as a checkpoint."""
    folder = tmp_path_factory.mktemp("p3")
    weights = tiny_gpt2(folder / "decoder_model.bin")
    model = captioner.build_captioner(TINY_ENCODER, Config(checkpoint=weights, adapter_dim=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 if "cross_gate" in name or ".up." in name else 0.05)
    checkpoint = str(folder / "p2.pt")
    captioner.save_checkpoint(checkpoint, model, extra={search.INFERENCE_KEY: dict(
        search.DECODE_DEFAULTS, method="greedy", max_len=6, chosen_on="test")})
    images = folder / "images"
    images.mkdir()
    for k, colour in enumerate(["red", "navy", "olive"]):
        Image.new("RGB", (40 + 8 * k, 32), colour).save(images / ("img %d.png" % k))
    return dict(folder=folder, weights=weights, checkpoint=checkpoint, images=images, model=model)


def test_maps_are_the_modules_probabilities_during_cached_decoding(trained):
    """Reference: during the real KV-cached greedy decoding, hook the last block's cross-attention input and
    recompute softmax(q k^T / sqrt(d)) from the module's own weights; the drawn maps must equal its head mean."""
    model = trained["model"].eval()
    decoder = model.decoder
    block = decoder.transformer.h[-1]
    pixels = model.encoder.transform(Image.new("RGB", (32, 32), "teal")).unsqueeze(0)
    image_tokens = model.image_tokens(pixels)
    seen = []
    handle = block.ln_cross.register_forward_hook(lambda m, args, out: seen.append(out[:, -1:].detach()))
    try:
        ids = search.generate(decoder, image_tokens, method="greedy", max_len=6)[0]
    finally:
        handle.remove()
    k, _ = block.cross_attn.memory(decoder.image_proj(image_tokens))
    n_head, head = decoder.cfg.n_head, decoder.cfg.n_embd // decoder.cfg.n_head
    reference = []
    for h in seen:  # one call per generated step, batch of 1
        q = block.cross_attn.q(h).view(1, 1, n_head, head).transpose(1, 2)
        reference.append(((q @ k.transpose(-2, -1)) / head ** 0.5).softmax(-1)[0, :, 0].mean(0))
    reference = torch.stack(reference)  # (steps, N)

    (ids2,), (per_block,) = search.generate(decoder, image_tokens, method="greedy", max_len=6, return_attention=True)
    assert ids2 == ids
    attention = per_block[-1].mean(0)  # the last block, head mean: what attention_maps draws by default
    assert attention.shape == reference.shape
    assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[0]), atol=1e-5)
    assert torch.allclose(attention, reference, atol=1e-5)
    maps = model.attention_maps(per_block)
    assert torch.allclose(maps.flatten(1), attention[:, 1:])


def test_attention_map_choices(trained):
    model = trained["model"]
    n = 1 + 4 * 4
    a0, a1 = torch.rand(3, 4, n), torch.rand(3, 4, n)
    grid = lambda a: a[:, 1:].reshape(-1, 4, 4)  # noqa: E731
    assert torch.equal(model.attention_maps([a0, None, a1]), grid(a1.mean(0)))
    assert torch.equal(model.attention_maps([a0, None, a1], "mean", "max"),
                       grid(torch.stack([a0, a1]).mean(0).max(0).values))
    assert torch.equal(model.attention_maps([a0, None, a1], "0", "2"), grid(a0[2]))
    assert torch.equal(model.attention_maps([a0, None, a1], "-1"), grid(a1.mean(0)))
    with pytest.raises(UserError, match="block 1 has no cross-attention"):
        model.attention_maps([a0, None, a1], "1")
    with pytest.raises(UserError, match="--layer 99: the decoder has blocks 0..2"):  # no wrap-around to block 0
        model.attention_maps([a0, None, a1], "99")
    with pytest.raises(UserError, match="--heads 3: the decoder has 3 heads"):
        model.attention_maps([a0, None, a1], "last", "3")
    with pytest.raises(UserError, match="no cross-attention"):
        model.attention_maps([None, None])


def test_token_labels_mark_word_pieces():
    from tokenizer import BPETokenizer

    tokenizer = BPETokenizer()
    ids = tokenizer.encode("a skateboarder, unbelievably")
    labels = p3.token_labels(ids, tokenizer, ended=True)
    assert labels[-1] == p3.END_TEXT and len(labels) == len(ids) + 1
    assert "".join(label.replace(p3.CONTINUATION_MARK, "") for label in labels[:-1]).replace(",", "") == \
        "askateboarderunbelievably"
    pieces = [tokenizer.decode([i]) for i in ids]
    for piece, label in zip(pieces, labels):
        continues = not piece[:1].isspace() and piece[:1].isalnum() and piece is not pieces[0]
        assert label.startswith(p3.CONTINUATION_MARK) == continues


def test_cli_draws_every_image_and_the_index(trained, tmp_path):
    out = tmp_path / "figures"
    assert p3.main(["--images", str(trained["images"]), "--checkpoint", trained["checkpoint"],
                    "--decoder", trained["weights"], "--out", str(out), "--device", "cpu"]) == 0
    for k in range(3):
        with Image.open(out / ("img %d.png" % k)) as figure:
            assert figure.size[0] > 200
    index = (out / "index.md").read_text()
    assert index.count("![") == 3 and (out / "index.html").is_file()
    summary = json.loads((out / "attention.json").read_text())
    assert [e["image"] for e in summary["figures"]] == ["img 0.png", "img 1.png", "img 2.png"]
    assert sorted(os.listdir(str(tmp_path))) == ["figures"]  # no temporary folder left beside it


def test_cli_output_folder_is_complete_or_absent(trained, tmp_path, monkeypatch):
    out = tmp_path / "figures"
    common = ["--images", str(trained["images"]), "--checkpoint", trained["checkpoint"], "--decoder",
              trained["weights"], "--out", str(out), "--device", "cpu"]
    assert p3.main(common) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(str(out))}
    drawn = []
    real = p3.draw_figure

    def fail_on_the_third(*args):
        drawn.append(args[-1])
        if len(drawn) == 3:
            raise UserError("disk full (simulated)")
        real(*args)

    monkeypatch.setattr(p3, "draw_figure", fail_on_the_third)
    with pytest.raises(UserError, match="disk full"):
        p3.main(common + ["--layer", "0"])
    assert {name: (out / name).read_bytes() for name in os.listdir(str(out))} == before  # the earlier run survives
    assert sorted(os.listdir(str(tmp_path))) == ["figures"]


def test_cli_refuses_what_would_go_wrong_before_any_work(trained, tmp_path):
    common = ["--checkpoint", trained["checkpoint"], "--decoder", trained["weights"], "--device", "cpu"]
    twin = tmp_path / "elsewhere"
    twin.mkdir()
    Image.new("RGB", (32, 32), "red").save(twin / "img 0.png")
    with pytest.raises(UserError, match="img 0.png would both be drawn"):  # two figures of one name
        p3.main(["--images", str(trained["images"]), str(twin), "--out", str(tmp_path / "o")] + common)
    for bad in (["--layer", "abc"], ["--heads", "abc"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_:
            p3.main(["--images", str(trained["images"]), "--out", str(tmp_path / "o")] + common + bad)
        assert exit_.value.code == 2
    assert not (tmp_path / "o").exists()


def test_cli_best_and_worst_from_scores(trained, tmp_path):
    scores = tmp_path / "per_image.json"
    scores.write_text(json.dumps({"img 0": {"clipscore": 0.5}, "img 1": {"clipscore": 0.9},
                                  "img 2": {"clipscore": 0.7}}))
    out = tmp_path / "best_worst"
    p3.main(["--images", str(trained["images"]), "--checkpoint", trained["checkpoint"], "--decoder",
             trained["weights"], "--out", str(out), "--from-scores", str(scores), "--device", "cpu"])
    summary = json.loads((out / "attention.json").read_text())
    assert [(e["image"], e["score"]) for e in summary["figures"]] == [("img 1.png", 0.9), ("img 0.png", 0.5)]
    assert sorted(os.listdir(out)) == ["attention.json", "img 0.png", "img 1.png", "index.html", "index.md"]
    scores.write_text(json.dumps({"ghost": {"clipscore": 1.0}}))
    with pytest.raises(UserError, match="ghost"):
        p3.main(["--images", str(trained["images"]), "--checkpoint", trained["checkpoint"], "--decoder",
                 trained["weights"], "--out", str(out), "--from-scores", str(scores)])
