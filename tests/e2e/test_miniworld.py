"""The miniature world: deterministic generator, homework-shaped files, exact boxes, object F1, committed models."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from miniworld import generate, world
from hw3 import REPO_ROOT as ROOT


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2

MODELS = os.path.join(ROOT, "miniworld", "models")
CLIP_CONFIG = os.path.join(MODELS, "tiny_clip.json")
CLIP_WEIGHTS = os.path.join(MODELS, "tiny_clip.pt")
GPT2_WEIGHTS = os.path.join(MODELS, "decoder_model.bin")


def tree_digest(folder: str) -> dict:
    digest = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world") / "w")
    generate.generate(out, seed=3, small=True)
    return out


def read(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_generator_is_deterministic_for_a_seed(small_world, tmp_path):
    again = str(tmp_path / "again")
    generate.generate(again, seed=3, small=True)
    first = tree_digest(small_world)
    assert len(first) > 100 and first == tree_digest(again)
    other = str(tmp_path / "other")
    generate.generate(other, seed=4, small=True)
    assert tree_digest(other)["p2/train.json"] != first["p2/train.json"]


def test_p1_split_is_shaped_like_the_homework(small_world):
    id2label = read(os.path.join(small_world, "p1", "id2label.json"))
    assert sorted(id2label, key=int) == [str(i) for i in range(50)]
    assert len(set(id2label.values())) == 50 and id2label["0"] == "red circle"
    heldout = read(os.path.join(small_world, "p1", "heldout.json"))
    assert len(heldout["labels"]) == 10 and [id2label[str(i)] for i in heldout["labels"]] == heldout["names"]
    # neither the colour nor the shape alone names a held-out class among the held-out ones
    colors = [n.split()[0] for n in heldout["names"]]
    shapes = [n.split()[1] for n in heldout["names"]]
    assert all(colors.count(c) == 2 for c in colors) and all(shapes.count(s) == 2 for s in shapes)
    files = sorted(os.listdir(os.path.join(small_world, "p1", "val")))
    assert len(files) == 50 * generate.SMALL["p1_per_class"]
    for name in files:
        label, _ = re.fullmatch(r"(\d+)_(\d+)\.png", name).groups()
        assert label in id2label
    with Image.open(os.path.join(small_world, "p1", "val", files[0])) as image:
        assert image.mode == "RGB" and image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    # p1_heldout: the same images of the held-out classes, relabelled 0..9 as a P1 split of their own
    sub = read(os.path.join(small_world, "p1_heldout", "id2label.json"))
    assert [sub[str(i)] for i in range(10)] == heldout["names"]
    sub_files = sorted(os.listdir(os.path.join(small_world, "p1_heldout", "val")))
    assert len(sub_files) == 10 * generate.SMALL["p1_per_class"]
    digest = tree_digest(small_world)
    for name in sub_files:
        label, image_id = name.split("_")
        original = "%d_%s" % (heldout["labels"][int(label)], image_id)
        assert digest[os.path.join("p1_heldout", "val", name)] == digest[os.path.join("p1", "val", original)]


def test_p2_split_is_coco_style_with_several_captions(small_world):
    for split, count in (("train", generate.SMALL["p2_train"]), ("val", generate.SMALL["p2_val"])):
        data = read(os.path.join(small_world, "p2", "%s.json" % split))
        assert set(data) >= {"images", "annotations"} and len(data["images"]) == count
        ids = {im["id"] for im in data["images"]}
        for im in data["images"]:
            assert os.path.isfile(os.path.join(small_world, "p2", "images", split, im["file_name"]))
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        per_image = {}
        for a in data["annotations"]:
            assert a["image_id"] in ids and isinstance(a["caption"], str)
            per_image.setdefault(a["image_id"], []).append(a["caption"])
        assert all(len(set(c)) == generate.SMALL["captions"] for c in per_image.values())
    val = read(os.path.join(small_world, "p2", "val.json"))
    assert {im["file_name"] for im in val["images"]} == {s["file_name"] for s in
                                                         read(os.path.join(small_world, "p2", "val_objects.json")).values()}


def test_every_reference_caption_names_exactly_its_scene(small_world):
    """The object-F1 parser against the generator: each reference caption names the scene's objects, no more."""
    val = read(os.path.join(small_world, "p2", "val.json"))
    scenes = read(os.path.join(small_world, "p2", "val_objects.json"))
    names = {im["id"]: os.path.splitext(im["file_name"])[0] for im in val["images"]}
    truth = {k: [(o["color"], o["shape"]) for o in s["objects"]] for k, s in scenes.items()}
    for a in val["annotations"]:
        key = names[a["image_id"]]
        scores = world.object_scores({key: a["caption"]}, {key: truth[key]})
        assert scores["object_f1"] == 1.0 and scores["exact_object_set"] == 1.0, a["caption"]


def test_boxes_and_masks_hold_their_objects_pixels(small_world):
    from pycocotools import mask as mask_utils

    scenes = read(os.path.join(small_world, "p2", "val_objects.json"))
    scenes_p3 = read(os.path.join(small_world, "p3", "objects.json"))
    folders = [("p2/images/val", scenes), ("p3/images", scenes_p3)]
    palette = np.asarray(list(world.COLORS.values()), dtype=np.float64)
    for folder, table in folders:
        for scene in table.values():
            image = np.asarray(Image.open(os.path.join(small_world, folder, scene["file_name"])), dtype=np.float64)
            for obj in scene["objects"]:
                rle = dict(obj["segmentation"], counts=obj["segmentation"]["counts"].encode("ascii"))
                mask = mask_utils.decode(rle).astype(bool)
                x, y, w, h = obj["bbox"]
                inside = np.zeros_like(mask)
                inside[y:y + h, x:x + w] = True
                assert mask.sum() > 20 and not (mask & ~inside).any()
                assert mask[y, :].any() and mask[y + h - 1, :].any() and mask[:, x].any() and mask[:, x + w - 1].any()
                mean = image[mask].mean(0)
                nearest = world.COLOR_NAMES[int(np.argmin(((palette - mean) ** 2).sum(1)))]
                assert nearest == obj["color"]


@pytest.mark.parametrize("caption, expected", [
    ("a small red circle to the left of a blue square", [("red", "circle"), ("blue", "square")]),
    ("two big green stars and a cross", [("green", "star"), ("green", "star"), (None, "cross")]),
    ("A Black Triangle.", [("black", "triangle")]),
    ("a picture of a gray background", []),
])
def test_parse_objects(caption, expected):
    assert world.parse_objects(caption) == expected


def test_object_scores_micro_average():
    scenes = {"a": [("red", "circle"), ("blue", "square")], "b": [("green", "star")]}
    predictions = {"a": "a red circle and a blue star", "b": "a green star"}
    scores = world.object_scores(predictions, scenes)
    tp, n_pred, n_true = 2, 3, 3  # counted by hand from the captions above
    assert scores["object_precision"] == pytest.approx(tp / n_pred)
    assert scores["object_recall"] == pytest.approx(tp / n_true)
    assert scores["object_f1"] == pytest.approx(2 * tp / (n_pred + n_true))
    assert scores["exact_object_set"] == pytest.approx(0.5)
    assert world.object_scores({}, scenes)["object_f1"] == 0.0


def test_generate_refuses_a_foreign_folder(tmp_path):
    import subprocess

    (tmp_path / "mine.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "miniworld.generate", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not a miniworld folder" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.skipif(not os.path.isfile(CLIP_WEIGHTS), reason="tiny CLIP not built (bash miniworld/build_models.sh)")
def test_tiny_clip_loads_through_clip_utils_and_classifies(small_world):
    from hw3.models import clip_backend

    model, preprocess, tokenizer = clip_backend.load_clip(CLIP_CONFIG, CLIP_WEIGHTS, "cpu")
    state = torch.load(CLIP_WEIGHTS, map_location="cpu")
    rows = state["token_embedding.weight"].float()
    assert (rows.abs().sum(1) == 0).float().mean() > 0.99  # unused token rows are exactly zero
    names = world.class_names()
    folder = os.path.join(small_world, "p1", "val")
    files = sorted(os.listdir(folder))
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(["a photo of a %s." % n for n in names])), dim=-1)
        images = torch.stack([preprocess(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])
        feats = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    predicted = (feats @ text.t()).argmax(1)
    labels = torch.tensor([int(f.split("_")[0]) for f in files])
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy > 25 * (1.0 / len(names)), accuracy  # chance is 0.02


@pytest.mark.skipif(not os.path.isfile(GPT2_WEIGHTS), reason="tiny GPT-2 not built (bash miniworld/build_models.sh)")
def test_tiny_gpt2_loads_through_decoder_and_matches_transformers():
    from hw3.models.gpt2 import Config, Decoder
    from hw3.data.tokenizer import END_TOKEN, BPETokenizer
    transformers = pytest.importorskip("transformers")

    state = torch.load(GPT2_WEIGHTS, map_location="cpu")
    decoder = Decoder(Config(checkpoint=GPT2_WEIGHTS)).eval()
    cfg = decoder.cfg
    assert (cfg.vocab_size, cfg.n_embd, cfg.n_head) == (50257, 128, 2)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head))
    reference.transformer.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    reference.tie_weights()
    reference.eval()
    tokenizer = BPETokenizer()
    caption = [END_TOKEN] + tokenizer.encode("a small red circle to the left of a blue square") + [END_TOKEN]
    tokens = torch.tensor([caption])
    with torch.no_grad():
        logits = decoder(tokens)
        torch.testing.assert_close(logits, reference(tokens).logits, atol=1e-4, rtol=1e-4)
        # it has learnt the world's language: a real caption is far likelier than the same tokens shuffled
        shuffled = torch.tensor([[caption[0]] + caption[1:-1][::-1] + [caption[-1]]])
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
        loss_shuffled = torch.nn.functional.cross_entropy(decoder(shuffled)[0, :-1], shuffled[0, 1:])
    assert loss < 0.25 * np.log(cfg.vocab_size) and loss_shuffled > loss + 2.0  # uniform guessing: log(vocab)


VIT_WEIGHTS = os.path.join(ROOT, "miniworld", "models", "caption_vit.pt")


def test_patch_targets_follow_the_masks():
    """Dense targets of the captioning encoder: a patch inside an object carries its colour, shape, size and region;
    a patch far from every object is background (0); and the labels agree with the object's own mask."""
    from miniworld import train_vit

    image, objects, alphas = train_vit.scene(0, 3)
    grid = train_vit.ARCH["img_size"] // train_vit.ARCH["patch_size"]
    targets = train_vit.patch_targets(objects, alphas, grid)
    cell = world.IMAGE_SIZE // grid
    assert set(targets) == {"color", "shape", "size", "region"}
    for obj in objects:
        row, col = int(obj["cy"] // cell), int(obj["cx"] // cell)
        k = row * grid + col  # the patch holding the object's centre
        assert targets["color"][k] == world.COLOR_NAMES.index(obj["color"]) + 1
        assert targets["shape"][k] == world.SHAPES.index(obj["shape"]) + 1
        assert targets["size"][k] == ("small", "large").index(obj["size"]) + 1
        assert 1 <= targets["region"][k] <= 9
    covered = np.stack(alphas).max(0)[:grid * cell, :grid * cell].reshape(grid, cell, grid, cell).mean((1, 3))
    assert np.array_equal(targets["shape"] > 0, covered.reshape(-1) >= train_vit.MIN_COVERAGE)


@pytest.mark.skipif(not os.path.isfile(CLIP_WEIGHTS), reason="tiny CLIP not built (bash miniworld/build_models.sh)")
def test_tiny_vit_starts_as_the_tiny_clip_tower_and_trains(tmp_path):
    """train_vit's timm tower, converted by timm from the tiny CLIP, gives the same tokens as the open_clip tower; two
    training steps write a file that the captioner's timm spec loads (fp16 weights, same architecture)."""
    from hw3.models import clip_backend
    from hw3.models.encoder import ImageEncoder
    from miniworld import train_vit
    from tiny_models import open_clip_tokens

    clip_visual = clip_backend.load_clip(CLIP_CONFIG, CLIP_WEIGHTS, "cpu")[0].visual
    vit = train_vit.initial_model(CLIP_WEIGHTS).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        clip_tower = open_clip_tokens(clip_visual, x)
        torch.testing.assert_close(vit.forward_features(x), clip_tower, atol=1e-4, rtol=1e-4)
    out = str(tmp_path / "vit.pt")
    final = train_vit.train(out, seed=0, steps=2, batch_size=4, init=CLIP_WEIGHTS)
    assert final["step"] == 2 and os.path.isfile(out) and os.path.isfile(str(tmp_path / "vit.log.json"))
    encoder = ImageEncoder(train_vit.spec(out), offline=True)
    assert encoder.grid_size == (8, 8) and encoder.width == 128 and encoder.num_prefix_tokens == 1
    with torch.no_grad():
        moved = (encoder(x) - clip_tower).abs().max().item()
    assert 0 < moved < 10  # trained a little away from the start, still finite


@pytest.mark.skipif(not os.path.isfile(VIT_WEIGHTS), reason="tiny ViT not built (bash miniworld/build_models.sh)")
def test_committed_tiny_vit_tells_shapes_apart_on_its_patches():
    """The committed captioning encoder has learnt what it was trained for: a linear read-out fitted on a few scenes'
    patch tokens names the shape under held-out object patches far above chance (1/5)."""
    from hw3.models.encoder import ImageEncoder
    from miniworld import train_vit

    encoder = ImageEncoder(train_vit.spec(VIT_WEIGHTS), offline=True)
    grid = encoder.grid_size[0]
    feats, shapes = [], []
    for index in range(120):
        image, objects, alphas = train_vit.scene(99, index)  # a seed the training never used
        with torch.no_grad():
            tokens = encoder(encoder.transform(Image.fromarray(image)).unsqueeze(0))[0, 1:]
        target = train_vit.patch_targets(objects, alphas, grid)["shape"]
        feats.append(tokens[target > 0])
        shapes.append(torch.from_numpy(target[target > 0]) - 1)
    split = 80
    x_fit, y_fit = torch.cat(feats[:split]), torch.cat(shapes[:split])
    x_test, y_test = torch.cat(feats[split:]), torch.cat(shapes[split:])
    probe = torch.nn.Linear(x_fit.shape[1], len(world.SHAPES))
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x_fit), y_fit) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    accuracy = (probe(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.75, accuracy


@pytest.mark.skipif(not os.path.isfile(GPT2_WEIGHTS), reason="tiny GPT-2 not built (bash miniworld/build_models.sh)")
def test_tiny_gpt2_says_which_shape_its_context_pins_down():
    """The tiny GPT-2 can name a shape with confidence when its context decides it (a second caption of a scene after
    the first), as a real GPT-2 names what its context pins down. A model trained on lone captions, where shapes are
    interchangeable, let their embeddings collapse and named them at chance; captioners on it could not learn shapes."""
    from hw3.models.gpt2 import Config, Decoder
    from miniworld import train_gpt2
    from hw3.data.tokenizer import END_TOKEN, BPETokenizer

    decoder = Decoder(Config(checkpoint=GPT2_WEIGHTS)).eval()
    tokenizer = BPETokenizer()
    hits = 0
    for color in world.COLOR_NAMES:
        for shape in world.SHAPES:
            ids = [END_TOKEN] + tokenizer.encode("a %s %s" % (color, shape)) + [END_TOKEN] \
                + tokenizer.encode("there is a %s" % color)
            with torch.no_grad():
                top = int(decoder(torch.tensor([ids]))[0, -1].argmax())
            hits += tokenizer.decode([top]).strip() == shape
    assert hits >= 45, hits  # of 50; chance among the shapes is 10
    wte = torch.load(GPT2_WEIGHTS, map_location="cpu")["wte.weight"].float()
    assert train_gpt2.shape_cosine(wte, tokenizer) < 0.9


def test_pointing_game_maps_back_through_resize_and_crop():
    from miniworld import pointing
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
    # original 64x48: resized to 43x32, the crop keeps x in [5.5, 37.5) of the resized image
    maps = torch.zeros(2, 4, 4)
    maps[1, 1, 3] = 1.0  # peak at shown (28, 12) -> original x = (28 + 5.5) * 48/32 ~ 50, y = 12 * 1.5 = 18
    objects = [dict(color="red", shape="circle", bbox=[44, 10, 16, 16]),
               dict(color="blue", shape="square", bbox=[0, 0, 10, 10])]
    assert pointing.pointing_game(["red", "circle"], maps, objects, (64, 48), transform) == (1, 1)
    assert pointing.pointing_game(["red", "circles"], maps, objects, (64, 48), transform) == (1, 1)
    objects[0]["bbox"] = [0, 0, 30, 30]
    assert pointing.pointing_game(["red", "circle"], maps, objects, (64, 48), transform) == (0, 1)
    assert pointing.pointing_game(["green", "circle"], maps, objects, (64, 48), transform) == (0, 0)


def test_train_captioners_runs_pass_p2_trains_checks():
    """Every run miniworld.train_captioners can start is one p2_train.py accepts (a from-scratch arch given no
    GPT-2 or PEFT option), and the PEFT runs keep their recipe."""
    import argparse

    from hw3.models import registry
    from hw3.training import cli
    from hw3.pipeline import trainings
    from miniworld import train_captioners

    settings = argparse.Namespace(val_images=100, epochs=5, batch_size=32, lr=5e-3, label_smoothing=0.0, gate=False,
                                  seed=0)
    for name in list(train_captioners.METHOD_SETTINGS) + list(train_captioners.ARCH_SETTINGS):
        command = train_captioners.command(name, "world", "out", "cache", settings)
        args = cli.parse_args(command[2:])
        cfg = registry.config_from_args(args)
        if name in train_captioners.METHOD_SETTINGS:
            assert (args.arch, args.peft, args.epochs, args.lr, cfg.cross_attn_gate) == ("gpt2", name, 5, 5e-3, False)
        else:
            assert args.arch == name.split("_")[0] and args.decoder_weights is None
        installed = read(os.path.join(MODELS, "p2_%s.json" % name))  # the settings the report's best setting names
        assert installed["training"] == {k: getattr(args, k) for k in trainings.TRAINING_RECORD}, name
    reg0 = cli.parse_args(train_captioners.command("attention-gru_reg0", "w", "o", "c", settings)[2:])
    assert reg0.attention_reg == 0.0


def test_committed_classic_captioners_were_made_by_arch_settings():
    """miniworld/models/p2_<run>.json of every from-scratch run holds the decoder ARCH_SETTINGS builds, the command
    that retrains it and its time; each checkpoint stays small enough to commit."""
    import argparse

    from hw3.models import registry
    from hw3.training import cli
    from miniworld import train_captioners

    settings = argparse.Namespace(val_images=100, seed=0)
    for name in train_captioners.ARCH_SETTINGS:
        meta = read(os.path.join(MODELS, "p2_%s.json" % name))
        args = cli.parse_args(train_captioners.command(name, "world", "out", "cache", settings)[2:])
        expected = registry.config_from_args(args).to_dict()
        for field in ("output_ids", "encoder_dim", "block_size"):  # known once the captions and encoder are read
            expected.pop(field)
        assert meta["arch"] == args.arch and {k: meta["decoder"][k] for k in expected} == expected, name
        assert meta["trained_with"] == "python3 -m miniworld.train_captioners --archs %s --seed 0" % name
        assert meta["train_seconds"] > 0
        assert os.path.getsize(os.path.join(MODELS, "p2_%s.pt" % name)) < 10 * 2 ** 20


def test_train_captioners_scst_fine_tunes_the_committed_checkpoint(tmp_path, monkeypatch):
    """--scst: p2_train.py from the committed checkpoint, no cross-entropy epoch, and the model options it was
    trained with (p2_train.py accepts the command; --init-from refuses any other config at run time)."""
    from hw3.training import cli
    from miniworld import train_captioners
    monkeypatch.chdir(ROOT)
    args = train_captioners.parse_args(["--methods", "lora", "--scst", "--scst-epochs", "2", "--scst-lr", "5e-4"])
    argv = train_captioners.command("lora", str(tmp_path / "world"), str(tmp_path / "out"), str(tmp_path / "cache"),
                                    args)[2:]
    parsed = cli.parse_args(argv)
    assert (parsed.init_from, parsed.epochs, parsed.scst_epochs, parsed.scst_lr, parsed.scst_samples) == \
        (os.path.join("miniworld", "models", "p2_lora.pt"), 0, 2, 5e-4, 5)
    assert (parsed.peft, parsed.lora_rank, parsed.lora_alpha, parsed.no_cross_attn_gate) == ("lora", 8, 16.0, True)
    assert train_captioners.installed("lora", True) == os.path.join("miniworld", "models", "p2_lora_scst.pt")


def test_committed_scst_captioner_is_the_lora_model_fine_tuned():
    """p2_lora_scst.pt rebuilds the committed LoRA captioner's model, records its SCST settings and how it was made."""
    before, after = read(os.path.join(MODELS, "p2_lora.json")), read(os.path.join(MODELS, "p2_lora_scst.json"))
    assert after["decoder"] == before["decoder"] and after["tensors"] == before["tensors"]
    assert after["scst"]["init_from"] == os.path.join("miniworld", "models", "p2_lora.pt")
    assert after["phase"] == "scst" and after["train_seconds"] > 0
    assert "--scst-epochs %d" % after["scst"]["scst_epochs"] in after["trained_with"]


def test_score_prints_the_readme_columns_of_each_checkpoint(tmp_path, capsys):
    """miniworld.score (the README's SCST table): hw3_2.sh's code with the asked beam, then the suite and object F1,
    the latter equal to world.object_scores of the captions it wrote; a folder that is no world is refused."""
    from hw3.util.errors import UserError
    from miniworld import score

    data = str(tmp_path / "data")
    generate.generate(data, 0, True, "course", os.path.join(MODELS, "decoder_model.bin"))
    out = str(tmp_path / "out")
    checkpoint = os.path.join(MODELS, "p2_lora.pt")
    assert score.main([checkpoint, "--data", data, "--beam-size", "1", "--out", out]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(checkpoint + " (beam 1): CIDEr ")
    captions = read(os.path.join(out, "p2_lora_beam1.json"))
    f1 = world.object_scores(captions, score.scenes_of(os.path.join(data, "p2_data")))["object_f1"]
    assert "object_f1 %.4f" % f1 in line and len(captions) == generate.SMALL["p2_val"]
    with pytest.raises(UserError, match="not a course-layout world"):
        score.main([checkpoint, "--data", str(tmp_path)])
