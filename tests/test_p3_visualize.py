"""p3_visualize.py: the maps drawn are the module's attention probabilities, on the right patch grid."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

import p3_visualize as p3
from common import UserError
from tiny_models import TINY_ENCODER, tiny_gpt2

captioner = pytest.importorskip("captioner")


@pytest.mark.parametrize("spec, prefix, grid", [
    ("timm:vit_tiny_patch16_224@none?depth=1&img_size=224", 1, (14, 14)),
    ("timm:vit_tiny_patch16_224@none?depth=1&img_size=256&reg_tokens=4", 5, (16, 16)),
    ("timm:vit_tiny_patch16_224@none?depth=1&img_size=[64,32]&patch_size=8", 1, (8, 4)),
])
def test_patch_grid_for_encoder_geometries(spec, prefix, grid):
    encoder = captioner.ImageEncoder(spec)
    assert (encoder.num_prefix_tokens, encoder.grid_size) == (prefix, grid)
    h, w = grid
    with torch.no_grad():
        tokens = encoder(torch.zeros((1, 3) + tuple(encoder.model.patch_embed.img_size)))
    assert tokens.shape[1] == prefix + h * w
    attention = torch.arange(prefix + h * w, dtype=torch.float).unsqueeze(0)  # token index as its "attention"
    maps = p3.patch_maps(attention, encoder.num_prefix_tokens, encoder.grid_size)
    assert maps.shape == (1, h, w)
    for i in range(h):  # row-major patch order: patch (i, j) is token prefix + i * w + j
        for j in range(w):
            assert maps[0, i, j] == prefix + i * w + j
    with pytest.raises(ValueError, match="prefix tokens"):
        p3.patch_maps(attention[:, 1:], prefix, grid)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny captioner with non-zero cross-attention gates, saved as a checkpoint."""
    from decoder import Config

    folder = tmp_path_factory.mktemp("p3")
    weights = tiny_gpt2(folder / "decoder_model.bin")
    model = captioner.build_captioner(TINY_ENCODER, Config(checkpoint=weights, adapter_dim=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 if "cross_gate" in name or ".up." in name else 0.05)
    checkpoint = str(folder / "p2.pt")
    captioner.save_checkpoint(checkpoint, model, extra={captioner.INFERENCE_KEY: dict(
        captioner.DECODE_DEFAULTS, method="greedy", max_len=6, chosen_on="test")})
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
    image_tokens = model.encode(pixels)
    seen = []
    handle = block.ln_cross.register_forward_hook(lambda m, args, out: seen.append(out[:, -1:].detach()))
    try:
        ids = captioner.generate(decoder, image_tokens, method="greedy", max_len=6)[0]
    finally:
        handle.remove()
    k, _ = block.cross_attn.memory(decoder.image_proj(image_tokens))
    n_head, head = decoder.cfg.n_head, decoder.cfg.n_embd // decoder.cfg.n_head
    reference = []
    for h in seen:  # one call per generated step, batch of 1
        q = block.cross_attn.q(h).view(1, 1, n_head, head).transpose(1, 2)
        reference.append(((q @ k.transpose(-2, -1)) / head ** 0.5).softmax(-1)[0, :, 0].mean(0))
    reference = torch.stack(reference)  # (steps, N)

    (ids2,), (per_block,) = captioner.generate(decoder, image_tokens, method="greedy", max_len=6,
                                               return_attention=True)
    assert ids2 == ids
    attention = p3.reduce_attention(per_block, "last", "mean")
    assert attention.shape == reference.shape
    assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[0]), atol=1e-5)
    assert torch.allclose(attention, reference, atol=1e-5)
    maps = p3.patch_maps(attention, model.encoder.num_prefix_tokens, model.encoder.grid_size)
    assert torch.allclose(maps.flatten(1), attention[:, 1:])


def test_reduce_attention_choices():
    a0, a1 = torch.rand(3, 4, 5), torch.rand(3, 4, 5)
    assert torch.equal(p3.reduce_attention([a0, None, a1]), a1.mean(0))
    assert torch.equal(p3.reduce_attention([a0, None, a1], "mean", "max"), torch.stack([a0, a1]).mean(0).max(0).values)
    assert torch.equal(p3.reduce_attention([a0, None, a1], "0", "2"), a0[2])
    with pytest.raises(UserError, match="block 1 has no cross-attention"):
        p3.reduce_attention([a0, None, a1], "1")
    with pytest.raises(UserError, match="no cross-attention"):
        p3.reduce_attention([None, None])


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


def test_pointing_game_maps_back_through_resize_and_crop():
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
    # original 64x48: resized to 43x32, the crop keeps x in [5.5, 37.5) of the resized image
    maps = torch.zeros(2, 4, 4)
    maps[1, 1, 3] = 1.0  # peak at shown (28, 12) -> original x = (28 + 5.5) * 48/32 ~ 50, y = 12 * 1.5 = 18
    objects = [dict(color="red", shape="circle", bbox=[44, 10, 16, 16]),
               dict(color="blue", shape="square", bbox=[0, 0, 10, 10])]
    assert p3.pointing_game(["red", "circle"], maps, objects, (64, 48), transform) == (1, 1)
    assert p3.pointing_game(["red", "circles"], maps, objects, (64, 48), transform) == (1, 1)
    objects[0]["bbox"] = [0, 0, 30, 30]
    assert p3.pointing_game(["red", "circle"], maps, objects, (64, 48), transform) == (0, 1)
    assert p3.pointing_game(["green", "circle"], maps, objects, (64, 48), transform) == (0, 0)


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
