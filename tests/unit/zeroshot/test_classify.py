"""P1 CLI on a tiny random CLIP loaded from a checkpoint file: predictions match a plain reference computation,
the CSV covers every file once with names untouched, and every bad input gives a clear error and no CSV."""
from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hw3.models import clip_backend
from hw3.zeroshot import classify as p1
from hw3.zeroshot import prompt_templates
from hw3.util.errors import UserError
from hw3 import REPO_ROOT as ROOT

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ["bicycle", "aquarium_fish", "camel", "rabbit", "lamp", "maple_tree"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP config + its random weights saved to a file, id2label.json, and 18 small varied images."""
    root = tmp_path_factory.mktemp("p1world")
    config = str(root / "tiny-p1-clip.json")
    with open(config, "w") as f:
        json.dump(TINY_CONFIG, f)
    torch.manual_seed(0)
    model, _, _ = clip_backend.load_clip(config, None)
    weights = str(root / "tiny-p1-clip.pt")
    torch.save(model.state_dict(), weights)
    id2label = str(root / "id2label.json")
    with open(id2label, "w") as f:
        json.dump({str(i): name for i, name in enumerate(CLASSES)}, f)
    images = root / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in range(18):
        pixels = (rng.rand(32, 32, 3) * 255 * rng.rand(3)).astype(np.uint8)  # colour casts differ per image
        Image.fromarray(pixels).save(str(images / ("%d_%d.png" % (i % len(CLASSES), i))))
    return {"root": root, "config": config, "weights": weights, "id2label": id2label, "images": str(images)}


def run(world, out, *extra, images=None):
    args = [images or world["images"], world["id2label"], str(out), "--model", world["config"],
            "--pretrained", world["weights"], "--workers", "0", "--device", "cpu"] + list(extra)
    assert p1.main(args) == 0
    with open(str(out), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], {name: int(label) for name, label in rows[1:]}, rows


def reference_similarities(world, names, templates, folder=None):
    """Plain loops: every prompt and every image encoded on its own, normalised by hand."""
    model, preprocess, tokenizer = clip_backend.load_clip(world["config"], world["weights"])
    with torch.no_grad():
        classes = []
        for name in CLASSES:
            prompts = [t.replace("{}", name.replace("_", " ")) for t in templates]
            per_template = [F.normalize(model.encode_text(tokenizer([p]))[0], dim=0) for p in prompts]
            mean = torch.stack(per_template).mean(dim=0)
            classes.append(mean / mean.norm())
        text = torch.stack(classes)
        rows = []
        for name in names:
            image = Image.open(os.path.join(folder or world["images"], name)).convert("RGB")
            embedding = model.encode_image(preprocess(image)[None])[0]
            rows.append(text @ (embedding / embedding.norm()))
    return torch.stack(rows)  # (N, C)


def assert_argmax_matches(predicted, similarities, names):
    for i, name in enumerate(names):
        top2 = similarities[i].topk(2)
        if float(top2.values[0] - top2.values[1]) > 1e-4:
            assert predicted[name] == int(top2.indices[0]), name
        else:  # a near tie may break either way between batched and one-at-a-time float sums
            assert float(similarities[i].max() - similarities[i][predicted[name]]) <= 1e-4, name


@pytest.mark.parametrize("templates", ["cifar", "photo", "file"])
def test_predictions_equal_reference(world, tmp_path, templates):
    if templates == "file":
        path = tmp_path / "templates.txt"
        path.write_text("# my set\na tiny photo of a {object}.\n\nan icon of the {}\n", encoding="utf-8")
        spec, template_list = str(path), ["a tiny photo of a {}.", "an icon of the {}"]
    else:
        spec, template_list = templates, p1.load_templates(templates)
    header, predicted, _ = run(world, tmp_path / "pred.csv", "--templates", spec, "--batch-size", "4")
    names = sorted(os.listdir(world["images"]))
    assert header == ["filename", "label"] and sorted(predicted) == names
    assert_argmax_matches(predicted, reference_similarities(world, names, template_list), names)


def test_workers_and_batching_give_the_same_csv(world, tmp_path):
    _, single, _ = run(world, tmp_path / "a.csv", "--batch-size", "1")
    _, batched, _ = run(world, tmp_path / "b.csv", "--batch-size", "7", "--workers", "2")
    assert single == batched


def test_csv_keeps_every_file_name_once(world, tmp_path):
    folder = tmp_path / "odd names"
    folder.mkdir()
    names = ["a b.c.png", "ünïcødé 猫.png", "with,comma.png", "x.JPG", "0_1.jpeg"]
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (i * 40, 100, 200 - i * 30)).save(str(folder / name), format="PNG")
    (folder / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="notes.txt"):
        header, predicted, rows = run(world, tmp_path / "nested" / "new" / "pred.csv", images=str(folder))
    assert header == ["filename", "label"]
    assert sorted(r[0] for r in rows[1:]) == sorted(names) and len(rows) == len(names) + 1
    assert all(0 <= label < len(CLASSES) for label in predicted.values())
    with open(str(tmp_path / "nested" / "new" / "pred.csv"), encoding="utf-8") as f:
        assert f.readline() == "filename,label\n"


def test_any_image_mode_is_classified_as_rgb(world, tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    rgb = Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8))
    rgb.convert("L").save(str(folder / "gray.png"))
    rgb.convert("RGBA").save(str(folder / "rgba.png"))
    rgb.convert("P").save(str(folder / "palette.png"))
    rgb.convert("CMYK").save(str(folder / "cmyk.jpg"))
    Image.fromarray((np.random.RandomState(2).rand(32, 32) * 65535).astype(np.uint16)).save(str(folder / "deep.png"))
    _, predicted, _ = run(world, tmp_path / "pred.csv", images=str(folder))
    assert sorted(predicted) == sorted(os.listdir(str(folder)))


def test_evaluate_writes_accuracy_json(world, tmp_path):
    _, predicted, _ = run(world, tmp_path / "pred.csv", "--evaluate")
    with open(str(tmp_path / "pred.eval.json")) as f:
        result = json.load(f)
    truth = {name: int(name.split("_")[0]) for name in predicted}
    correct = sum(predicted[n] == truth[n] for n in predicted)
    assert result["n_images"] == len(predicted) and result["n_correct"] == correct
    assert result["accuracy"] == pytest.approx(correct / len(predicted))
    fish = [n for n in predicted if truth[n] == 1]
    assert result["per_class"]["1"]["name"] == "aquarium_fish"
    assert result["per_class"]["1"]["accuracy"] == pytest.approx(sum(predicted[n] == 1 for n in fish) / len(fish))


def read_eval(path):
    """An eval JSON without its timing."""
    result = json.loads(path.read_text(encoding="utf-8"))
    result.pop("seconds", None)
    return result


def test_compare_prompts_equals_separate_runs(world, tmp_path, capsys):
    """One run with --compare-prompts writes, for each compared template set, the CSV and the accuracy that a run of
    its own with --templates SET --evaluate writes, and the table holds the same accuracies."""
    one, separate = tmp_path / "one", tmp_path / "separate"
    run(world, one / "pred.csv", "--compare-prompts", "--evaluate", "--plot-top5", "2")
    table = (one / "pred.prompts.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    run(world, separate / "pred.csv", "--evaluate")
    assert (one / "pred.csv").read_bytes() == (separate / "pred.csv").read_bytes()
    assert read_eval(one / "pred.eval.json") == read_eval(separate / "pred.eval.json")
    assert p1.COMPARED_SETS == ("photo", "not-photo", "no-score", "single")
    accuracies = {}
    for key in p1.COMPARED_SETS:
        run(world, separate / (key + ".csv"), "--templates", key, "--evaluate")
        assert (one / ("pred.prompt_%s.csv" % key)).read_bytes() == (separate / (key + ".csv")).read_bytes(), key
        result = read_eval(one / ("pred.prompt_%s.eval.json" % key))
        assert result == read_eval(separate / (key + ".eval.json")), key
        accuracies[key] = result["accuracy"]
    assert len(set(accuracies.values())) > 1, "the template sets should not all agree on this world"
    rows = [line.split("|")[1:3] for line in table.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["This is a photo of {object}", "This is not a photo of {object}",
                                            "No {object}, no score.", "ensemble: cifar (18 templates)"]
    expected = [accuracies[key] for key, _ in prompt_templates.REPORT_TEMPLATES]
    expected.append(read_eval(one / "pred.eval.json")["accuracy"])
    assert [float(r[1].strip(" %")) for r in rows] == pytest.approx([100 * a for a in expected], abs=0.006)


@pytest.mark.parametrize("templates", ["cifar", "photo"])
def test_one_clip_load_one_image_pass_and_one_text_pass_per_template_set(world, tmp_path, monkeypatch, templates):
    loads, image_passes, text_sets, prompts = [], [], [], []
    load_clip, encode_images, class_embeddings = clip_backend.load_clip, p1.encode_images, p1.class_embeddings

    def counting_load_clip(*args, **kwargs):
        model, preprocess, tokenizer = load_clip(*args, **kwargs)
        loads.append(args[0])
        return model, preprocess, lambda texts, *a, **k: (prompts.extend(texts), tokenizer(texts, *a, **k))[1]

    def counting_encode_images(*args, **kwargs):
        image_passes.append(1)
        return encode_images(*args, **kwargs)

    def counting_class_embeddings(model, tokenizer, classnames, template_set, *args, **kwargs):
        text_sets.append(tuple(template_set))
        return class_embeddings(model, tokenizer, classnames, template_set, *args, **kwargs)

    monkeypatch.setattr(clip_backend, "load_clip", counting_load_clip)
    monkeypatch.setattr(p1, "encode_images", counting_encode_images)
    monkeypatch.setattr(p1, "class_embeddings", counting_class_embeddings)
    run(world, tmp_path / "pred.csv", "--templates", templates, "--evaluate", "--compare-prompts", "--plot-top5", "2")
    assert len(loads) == 1 and len(image_passes) == 1
    wanted = {tuple(p1.load_templates(templates))} | {tuple(prompt_templates.template_set(k)) for k in p1.COMPARED_SETS}
    assert sorted(text_sets) == sorted(wanted)  # each template set once
    assert len(prompts) == len(CLASSES) * sum(len(t) for t in wanted)


def test_plot_top5_writes_a_png(world, tmp_path):
    run(world, tmp_path / "pred.csv", "--plot-top5", "2")
    with Image.open(str(tmp_path / "pred.top5.png")) as image:
        assert image.format == "PNG" and image.size[1] > 200


def expect_error(world, tmp_path, match, images=None, id2label=None, extra=()):
    out = tmp_path / "out" / "pred.csv"
    args = [images or world["images"], id2label or world["id2label"], str(out), "--model", world["config"],
            "--pretrained", world["weights"], "--workers", "0", "--device", "cpu"] + list(extra)
    with pytest.raises(UserError, match=match):
        p1.main(args)
    assert not out.exists()
    assert not (out.parent.exists() and os.listdir(str(out.parent)))  # no temporary left behind


def write_json(path, obj):
    with open(str(path), "w") as f:
        json.dump(obj, f)
    return str(path)


def test_bad_folders(world, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(world, tmp_path, "no images", images=str(tmp_path / "empty"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.warns(UserWarning, match="a.txt"):
        expect_error(world, tmp_path, "no images", images=str(tmp_path / "texts"))
    expect_error(world, tmp_path, "not found", images=str(tmp_path / "absent"))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_image_is_named_and_old_csv_survives(world, tmp_path, workers):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(str(folder / ("%d_%d.png" % (i, i))))
    (folder / "3_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "pred.csv"
    out.write_text("previous results\n")
    with pytest.raises(UserError, match="3_bad.png"):
        p1.main([str(folder), world["id2label"], str(out), "--model", world["config"], "--pretrained",
                 world["weights"], "--workers", workers, "--batch-size", "2", "--device", "cpu"])
    assert out.read_text() == "previous results\n"
    assert sorted(os.listdir(str(tmp_path))) == ["broken", "pred.csv"]


def test_bad_id2label(world, tmp_path):
    expect_error(world, tmp_path, "without gaps; missing 1", id2label=write_json(tmp_path / "gap.json", {"0": "a", "2": "b"}))
    expect_error(world, tmp_path, "'cat' is not a non-negative integer",
                 id2label=write_json(tmp_path / "keys.json", {"0": "a", "cat": "b"}))
    expect_error(world, tmp_path, "not a non-empty string", id2label=write_json(tmp_path / "val.json", {"0": ""}))
    expect_error(world, tmp_path, "non-empty JSON object", id2label=write_json(tmp_path / "list.json", ["a", "b"]))
    (tmp_path / "bad.json").write_text("{oops")
    expect_error(world, tmp_path, "not valid JSON: .*bad.json", id2label=str(tmp_path / "bad.json"))
    expect_error(world, tmp_path, "id2label file not found", id2label=str(tmp_path / "none.json"))


def test_bad_templates_and_evaluate_names(world, tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a cat\n")
    expect_error(world, tmp_path, "t.txt line 1", extra=["--templates", str(tmp_path / "t.txt")])
    expect_error(world, tmp_path, "neither a file nor a named set", extra=["--templates", "nope"])
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(str(folder / "xxxx.png"))
    expect_error(world, tmp_path, "xxxx.png", images=str(folder), extra=["--evaluate"])


def test_clean_class_name():
    assert p1.clean_class_name("aquarium_fish") == "aquarium fish"
    assert p1.clean_class_name("  sweet__pepper ") == "sweet pepper"
    assert p1.clean_class_name("t-shirt") == "t-shirt"


def test_hw3_1_sh_fails_fast_offline_without_weights(world, tmp_path):
    script = os.path.join(ROOT, "hw3_1.sh")
    words = open(script).read().split()
    assert not set(words) & {"pip", "cd", "mkdir", "rm", "cp", "mv", "sudo"}
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"), HOME=str(tmp_path),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    out = tmp_path / "out" / "pred.csv"
    done = subprocess.run(["bash", script, world["images"], world["id2label"], str(out)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "hw3_download.sh" in last and "--pretrained PATH" in last
    assert not out.exists()


# ----------------------------------------------------------------------- without open_clip: OpenAI's clip package

class NormalizingTextEncoder:
    """An OpenAI model as open_clip's builder calls it: encode_text(texts, normalize=True)."""

    def __init__(self, model):
        self.model = model

    def encode_text(self, texts, normalize=False):
        embeddings = self.model.encode_text(texts)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings


def test_our_class_weights_equal_open_clips_builder(world):
    """The builder for OpenAI's models gives open_clip's build_zero_shot_classifier's class embeddings."""
    import open_clip
    from tiny_openai_clip import tiny_openai_clip

    names = [p1.clean_class_name(c) for c in CLASSES]
    fill_ins = [(lambda c, t=template: t.replace("{}", c)) for template in p1.load_templates("cifar")]
    openai_model = tiny_openai_clip()
    openai_tokenizer = functools.partial(clip_backend._openai_clip().tokenize, context_length=16)
    open_clip_model, _, open_clip_tokenizer = clip_backend.load_clip(world["config"], world["weights"])
    cases = ((openai_model, NormalizingTextEncoder(openai_model), openai_tokenizer),
             (open_clip_model, open_clip_model, open_clip_tokenizer))
    for model, as_open_clip_calls_it, tokenizer in cases:
        with torch.no_grad():
            ours = p1.build_zero_shot_weights(model, tokenizer, names, fill_ins, num_classes_per_batch=4, device="cpu")
            theirs = open_clip.build_zero_shot_classifier(as_open_clip_calls_it, tokenizer, names, fill_ins,
                                                          num_classes_per_batch=4, device="cpu", use_tqdm=False)
        assert ours.shape == theirs.shape == (32, len(CLASSES))
        assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.fixture(scope="module")
def openai_weights(tmp_path_factory):
    """The tiny OpenAI-format CLIP as a state-dict file, where OpenAI's clip keeps ViT-L/14@336px in a fake HOME."""
    from tiny_openai_clip import save_state_dict, tiny_openai_clip

    home = tmp_path_factory.mktemp("home")
    (home / ".cache" / "clip").mkdir(parents=True)
    path = save_state_dict(tiny_openai_clip(), str(home / ".cache" / "clip" / "ViT-L-14-336px.pt"))
    return {"home": str(home), "path": path}


def openai_reference(names, folder):
    """Plain loops over the tiny OpenAI model itself, as test_predictions_equal_reference does for open_clip."""
    from tiny_openai_clip import tiny_openai_clip

    clip = clip_backend._openai_clip()
    model = tiny_openai_clip()
    preprocess = clip.clip._transform(model.visual.input_resolution)
    with torch.no_grad():
        classes = []
        for name in CLASSES:
            prompts = [t.replace("{}", name.replace("_", " ")) for t in p1.load_templates("cifar")]
            per_template = [F.normalize(model.encode_text(clip.tokenize([p], context_length=16))[0], dim=0)
                            for p in prompts]
            classes.append(F.normalize(torch.stack(per_template).mean(dim=0), dim=0))
        text = torch.stack(classes)
        rows = [text @ F.normalize(model.encode_image(preprocess(Image.open(os.path.join(folder, n)))[None])[0], dim=0)
                for n in names]
    return torch.stack(rows)


def test_openai_backend_predictions_equal_the_model_run_directly(world, openai_weights, tmp_path):
    out = tmp_path / "pred.csv"
    assert p1.main([world["images"], world["id2label"], str(out), "--backend", "openai", "--pretrained",
                    openai_weights["path"], "--workers", "0", "--device", "cpu", "--evaluate"]) == 0
    with open(str(out), newline="", encoding="utf-8") as f:
        predicted = {name: int(label) for name, label in list(csv.reader(f))[1:]}
    names = sorted(os.listdir(world["images"]))
    assert sorted(predicted) == names
    assert_argmax_matches(predicted, openai_reference(names, world["images"]), names)
    assert json.loads((tmp_path / "pred.eval.json").read_text())["backend"] == "openai"


def hiding(folder, *modules):
    """A PYTHONPATH folder whose modules shadow installed packages and fail to import, as if not installed."""
    os.makedirs(str(folder), exist_ok=True)
    for module in modules:
        with open(os.path.join(str(folder), module + ".py"), "w") as f:
            f.write("raise ModuleNotFoundError(\"No module named '%s'\", name=%r)\n" % (module, module))
    return str(folder)


def run_hw3_1(world, tmp_path, home, hidden):
    env = dict(os.environ, HOME=home, HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=hiding(tmp_path / "hide", *hidden),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    out = tmp_path / "out" / "pred.csv"
    started = time.time()
    done = subprocess.run(["bash", os.path.join(ROOT, "hw3_1.sh"), world["images"], world["id2label"], str(out)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    return done, out, time.time() - started


def test_hw3_1_sh_without_open_clip_uses_openais_clip(world, openai_weights, tmp_path):
    done, out, _ = run_hw3_1(world, tmp_path, openai_weights["home"], ["open_clip"])
    assert done.returncode == 0, done.stderr
    with open(str(out), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    names = sorted(os.listdir(world["images"]))
    assert rows[0] == ["filename", "label"] and sorted(r[0] for r in rows[1:]) == names
    assert_argmax_matches({r[0]: int(r[1]) for r in rows[1:]}, openai_reference(names, world["images"]), names)


def test_hw3_1_sh_without_openai_weights_fails_fast_offline(world, tmp_path):
    done, out, seconds = run_hw3_1(world, tmp_path, str(tmp_path), ["open_clip"])
    assert done.returncode == 2 and not out.exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "hw3_download.sh" in lines[0], done.stderr
    assert "ViT-L-14-336px.pt" in lines[0] and seconds < 60


def test_hw3_1_sh_without_either_package_says_so_in_one_line(world, tmp_path):
    done, out, _ = run_hw3_1(world, tmp_path, str(tmp_path), ["open_clip", "clip"])
    assert done.returncode == 2 and not out.exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and "open_clip_torch" in lines[0] and "openai-clip" in lines[0]
