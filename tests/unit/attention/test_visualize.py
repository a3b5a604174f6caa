"""p3_visualize.py and its hook, Captioner.attention_maps: the maps drawn are the module's attention probabilities,
on the right patch grid; the output folder is complete or absent."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from PIL import Image

from hw3.models import captioner
from hw3.attention import visualize as p3
from hw3.models import decoding, search
from hw3.models.decoding import DecodingSettings
from hw3.util.errors import UserError
from hw3.models.gpt2 import Config, Decoder
from hw3.models.encoder import ImageEncoder
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
    captioner.save_checkpoint(checkpoint, model, extra={decoding.INFERENCE_KEY: dict(
        decoding.DECODE_DEFAULTS, method="greedy", max_len=6, chosen_on="test")})
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
        ids = search.generate(decoder, image_tokens, DecodingSettings(method="greedy", max_len=6))[0]
    finally:
        handle.remove()
    k, _ = block.cross_attn.memory(decoder.image_proj(image_tokens))
    n_head, head = decoder.cfg.n_head, decoder.cfg.n_embd // decoder.cfg.n_head
    reference = []
    for h in seen:  # one call per generated step, batch of 1
        q = block.cross_attn.q(h).view(1, 1, n_head, head).transpose(1, 2)
        reference.append(((q @ k.transpose(-2, -1)) / head ** 0.5).softmax(-1)[0, :, 0].mean(0))
    reference = torch.stack(reference)  # (steps, N)

    (ids2,), (per_block,) = search.generate(decoder, image_tokens, DecodingSettings(method="greedy", max_len=6),
                                            return_attention=True)
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
    from hw3.data.tokenizer import BPETokenizer

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
    assert (summary["layer"], summary["heads"]) == ("last", "mean")
    for entry in summary["figures"]:  # one record per panel token (max_len 6), the end token last when it ended
        tokens = entry["tokens"]
        assert 1 <= len(tokens) <= 7
        assert [t["word"] is None for t in tokens] == [t["label"] == p3.END_TEXT for t in tokens]
        assert all(0 < t["top10_share"] <= 1 and 0 <= t["entropy"] <= 1 for t in tokens)
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


@pytest.mark.parametrize("grid, top", [((14, 14), 20 / 196), ((4, 5), 0.1), ((5, 6), 0.1), ((1, 3), 1 / 3)])
def test_concentration_of_uniform_and_one_hot_maps(grid, top):
    """Uniform: the top ceil(N/10) patches hold ceil(N/10)/N (3 of 30, not 4 as ceil(0.1 * 30) gives in floating
    point), entropy 1; one patch: share 1, entropy 0. The scale of a map does not matter (maps are renormalised)."""
    n = grid[0] * grid[1]
    uniform = torch.full((1,) + grid, 0.7 / n)
    one_hot = torch.zeros((1,) + grid)
    one_hot[0, -1, -1] = 0.3
    maps = torch.cat([uniform, one_hot])
    assert torch.allclose(p3.top_share(maps), torch.tensor([top, 1.0], dtype=torch.float64))
    assert torch.allclose(p3.normalised_entropy(maps), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_concentration_between_the_extremes():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, :2] = 0.5  # two patches of 100: all of it in the top 10, entropy log 2 / log 100
    maps[1] = torch.arange(100, dtype=torch.float).view(10, 10)  # mass grows with the patch index
    share, entropy = p3.top_share(maps), p3.normalised_entropy(maps)
    assert share[0] == pytest.approx(1.0) and entropy[0] == pytest.approx(math.log(2) / math.log(100))
    assert share[1] == pytest.approx(sum(range(90, 100)) / sum(range(100)))
    assert p3.normalised_entropy(torch.ones(1, 1, 1)).tolist() == [0.0]  # a single patch: nothing to spread over


def test_whole_words_join_pieces_and_leave_the_end_token_out():
    labels = ["a", "sk", "##ate", "##boarder", ",", "un", "##real", p3.END_TEXT]
    assert p3.whole_words(labels, ended=True) == ["a", "skateboarder", "skateboarder", "skateboarder", ",", "unreal",
                                                  "unreal", None]
    assert p3.whole_words(labels[:3], ended=False) == ["a", "skate", "skate"]
    stats = p3.token_stats(labels, torch.rand(len(labels), 2, 2), ended=True)
    assert [s["label"] for s in stats] == labels and stats[-1]["word"] is None
    assert all(0 < s["top10_share"] <= 1 and 0 <= s["entropy"] <= 1 for s in stats)


@pytest.mark.parametrize("words", [2, 12, 40])
def test_long_titles_wrap_inside_the_figure(words):
    """A 200-character caption (plus the score line) is wrapped so every rendered line fits the figure's width,
    whatever the number of panels."""
    caption = ("a man in a bright orange safety vest is standing next to a large yellow construction vehicle "
               "while two other workers in white helmets look at a map spread out on the hood of a dusty old red pickup truck")
    assert len(caption) >= 200
    labels = caption.split()[:words]
    fig = p3.make_figure(Image.new("RGB", (64, 48), "gray"), labels, torch.rand(len(labels), 4, 4),
                         caption + "\nCLIPScore 0.7812")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        title = fig._suptitle
        lines = title.get_text().split("\n")
        assert len(lines) >= 2 and lines[-1] == "CLIPScore 0.7812"
        assert " ".join(lines[:-1]) == caption  # nothing dropped by the wrapping
        box, bar = title.get_window_extent(renderer), fig.axes[-1].get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= bar.x0 and box.y1 <= fig.bbox.height  # clear of the edges and colour bar
        for ax in fig.axes[:-1]:  # the panels and their labels start below the title
            assert ax.get_tightbbox(renderer).y1 <= box.y0 + 1
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_titles_and_labels_draw_every_character_without_warnings():
    """A caption with characters the font lacks (GPT-2 can emit CJK) and dollar signs (mathtext otherwise)."""
    import warnings

    import matplotlib.pyplot as plt

    labels = ["a", "\u5c71", "$5", p3.END_TEXT]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = p3.make_figure(Image.new("RGB", (32, 32), "gray"), labels, torch.rand(4, 2, 2), "a \u5c71 for $5 and $6")
        try:
            fig.canvas.draw()
            titles = [ax.get_title() for ax in fig.axes[:5]]
            assert fig._suptitle.get_text() == "a \\u5c71 for \\$5 and \\$6"
        finally:
            plt.close(fig)
    assert titles == [p3.END_TEXT, "a", "\\u5c71", "\\$5", p3.END_TEXT]
