"""p2_evaluate: the course's CLI end to end on synthetic images with a tiny CLIP, the importable evaluate(), and
clear refusals of mismatched or malformed inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hw3.evaluation import metrics
from hw3.evaluation import evaluate
from hw3.util.errors import UserError
from hw3 import REPO_ROOT as ROOT

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CAPTIONS = {"000000000001": ["A red square on a table.", "a red box", "Red block, close up."],
            "cat_2": ["A cat's toy.", "the cat isn't here", "a toy for a cat"],
            "dog": ["A dog in the park!", "a dog running on grass", "Dog (brown) outside."],
            "whatever": ["Two dogs play in the grass.", "dogs playing", "two puppies on a lawn"]}
PREDICTIONS = {"000000000001": "a red square", "cat_2": "A cat's toy.", "dog": "a dog on the grass",
               "whatever": "two cats on a bed"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images (.jpg and .png), a COCO-style annotation file, predictions, and a tiny CLIP config + checkpoint."""
    from PIL import Image

    from hw3.models import clip_backend

    root = tmp_path_factory.mktemp("p2eval")
    images = root / "images"
    images.mkdir()
    annotations = {"images": [], "annotations": []}
    for i, key in enumerate(CAPTIONS):
        name = key + (".png" if key == "dog" else ".jpg")
        Image.new("RGB", (40 + 7 * i, 30), (60 * i, 255 - 50 * i, 90)).save(str(images / name))
        annotations["images"].append({"file_name": name, "id": 100 + i})
        for j, caption in enumerate(CAPTIONS[key]):
            annotations["annotations"].append({"image_id": 100 + i, "id": 10 * i + j, "caption": caption})
    (root / "val.json").write_text(json.dumps(annotations))
    (root / "pred.json").write_text(json.dumps(PREDICTIONS))
    config = root / "tiny-clip-eval.json"
    config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    clip = clip_backend.load_clip(str(config), None, "cpu")
    weights = root / "tiny_clip.pt"
    torch.save(clip[0].state_dict(), str(weights))
    return {"root": root, "images": str(images), "ann": str(root / "val.json"), "pred": str(root / "pred.json"),
            "config": str(config), "weights": str(weights), "clip": clip}


def expected_scores(world, predictions=PREDICTIONS):
    model, preprocess, tokenizer = world["clip"]
    files = {os.path.splitext(n)[0]: n for n in os.listdir(world["images"])}
    paths = [os.path.join(world["images"], files[k]) for k in predictions]
    clip_mean, clip_each = metrics.clip_score(paths, list(predictions.values()), (model, preprocess, tokenizer))
    cider, cider_each = metrics.cider(predictions, CAPTIONS)
    return cider, cider_each, clip_mean, clip_each


def test_cli_end_to_end_with_tiny_clip(world, tmp_path):
    per_image = tmp_path / "per_image.json"
    cmd = [sys.executable, os.path.join(ROOT, "p2_evaluate.py"), "--pred_file", world["pred"],
           "--images_root", world["images"], "--annotation_file", world["ann"], "--clip-model", world["config"],
           "--clip-pretrained", world["weights"], "--batch-size", "3", "--device", "cpu", "--num-workers", "0",
           "--per-image", str(per_image)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip()
    assert line.startswith("CIDEr: ") and " | CLIPScore: " in line, line
    cider_text, clip_text = line[len("CIDEr: "):].split(" | CLIPScore: ")
    cider, cider_each, clip_mean, clip_each = expected_scores(world)
    assert float(cider_text) == pytest.approx(cider, abs=1e-12)
    assert float(clip_text) == pytest.approx(clip_mean, abs=1e-5)
    saved = json.loads(per_image.read_text())
    assert list(saved) == list(PREDICTIONS)
    for (key, entry), c, s in zip(saved.items(), clip_each, cider_each.values()):
        assert entry["caption"] == PREDICTIONS[key]
        assert entry["clipscore"] == pytest.approx(c, abs=1e-5) and entry["cider"] == pytest.approx(s, abs=1e-12)
    assert cider == pytest.approx(sum(e["cider"] for e in saved.values()) / len(saved), abs=1e-12)
    assert clip_mean == pytest.approx(sum(e["clipscore"] for e in saved.values()) / len(saved), abs=1e-6)


def test_evaluate_reuses_a_loaded_clip(world):
    result = metrics.evaluate(dict(PREDICTIONS), world["ann"], world["images"], metrics.Scoring(clip=world["clip"],
                                                                                                batch_size=2))
    cider, _, clip_mean, _ = expected_scores(world)
    assert result["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert result["CLIPScore"] == pytest.approx(clip_mean, abs=1e-6)
    assert set(result["per_image"]) == set(PREDICTIONS)


def test_prediction_order_does_not_change_the_scores(world):
    reordered = dict(reversed(list(PREDICTIONS.items())))
    a = metrics.evaluate(dict(PREDICTIONS), world["ann"], world["images"], metrics.Scoring(clip=world["clip"]))
    b = metrics.evaluate(reordered, world["ann"], world["images"], metrics.Scoring(clip=world["clip"]))
    assert a["CIDEr"] == pytest.approx(b["CIDEr"], abs=1e-12)
    assert a["CLIPScore"] == pytest.approx(b["CLIPScore"], abs=1e-6)


def test_key_mismatch_names_missing_and_extra_keys(world):
    predictions = dict(PREDICTIONS)
    del predictions["dog"]
    predictions["dog.png"] = "a dog"
    predictions["cat_3"] = "a cat"
    with pytest.raises(UserError) as err:
        metrics.evaluate(predictions, world["ann"], world["images"], metrics.Scoring(clip=world["clip"]))
    message = str(err.value)
    assert "1 image(s) without a prediction: dog" in message
    assert "2 key(s) not in the annotations: cat_3, dog.png" in message


def test_many_mismatched_keys_are_counted_and_shortened():
    references = {"k%03d" % i: ["a caption"] for i in range(40)}
    with pytest.raises(UserError) as err:
        metrics.check_predictions({"x%03d" % i: "c" for i in range(30)}, references)
    message = str(err.value)
    assert "40 image(s) without a prediction: k000, k001, k002, k003, k004 ..." in message
    assert "30 key(s) not in the annotations" in message and "k039" not in message


@pytest.mark.parametrize("bad, expected", [
    ([], "must be a JSON object"),
    ({**PREDICTIONS, "dog": 3}, "not strings: dog"),
])
def test_malformed_predictions_are_refused(world, bad, expected):
    with pytest.raises(UserError, match=expected):
        metrics.evaluate(bad, world["ann"], world["images"], metrics.Scoring(clip=world["clip"]))


def test_malformed_annotations_and_missing_files_are_refused(world, tmp_path):
    with pytest.raises(UserError, match="annotation file not found"):
        metrics.evaluate(dict(PREDICTIONS), str(tmp_path / "nope.json"), world["images"],
                         metrics.Scoring(clip=world["clip"]))
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(UserError, match=r"images\[0\] lacks"):
        metrics.evaluate(dict(PREDICTIONS), str(tmp_path / "bad.json"), world["images"],
                         metrics.Scoring(clip=world["clip"]))
    with pytest.raises(UserError, match="images root not found"):
        metrics.evaluate(dict(PREDICTIONS), world["ann"], str(tmp_path / "none"), metrics.Scoring(clip=world["clip"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="4 image.s. missing from"):
        metrics.evaluate(dict(PREDICTIONS), world["ann"], str(empty), metrics.Scoring(clip=world["clip"]))


def test_missing_clip_weights_fail_fast_offline(world):
    """The default CLIP (ViT-B-32 openai) is not downloaded here: one clear error naming what to run, at once."""
    import time

    from hw3.models import clip_backend

    open_clip = clip_backend._open_clip()
    if clip_backend.cached_weights(open_clip.get_pretrained_cfg("ViT-B-32", "openai")):
        pytest.skip("ViT-B-32 openai weights are cached on this machine")
    start = time.time()
    with pytest.raises(UserError) as err:
        evaluate.main(["--pred_file", world["pred"], "--images_root", world["images"],
                          "--annotation_file", world["ann"], "--device", "cpu"])
    assert time.time() - start < 5
    assert "hw3_download.sh" in str(err.value) and "\n" not in str(err.value)


def run_cli(world, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "p2_evaluate.py"), "--pred_file", world["pred"],
           "--images_root", world["images"], "--annotation_file", world["ann"], "--clip-model", world["config"],
           "--clip-pretrained", world["weights"], "--device", "cpu", "--num-workers", "0"] + list(extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_metrics_all_with_json_equals_pycocoevalcap(world, tmp_path):
    """--metrics all --json: exactly the nine keys, each equal to pycocoevalcap's scorer on the PTB-tokenised
    corpus (METEOR null with its reason on stderr where Java is missing), the line in the same order."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from hw3.evaluation import ptb

    out = tmp_path / "scores.json"
    run = run_cli(world, "--metrics", "all", "--json", str(out))
    assert run.returncode == 0, run.stderr
    saved = json.loads(out.read_text())
    assert list(saved) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore",
                           "RefCLIPScore"]
    gts = ptb.tokenize({k: CAPTIONS[k] for k in PREDICTIONS})
    res = ptb.tokenize({k: [v] for k, v in PREDICTIONS.items()})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [saved["BLEU-%d" % n] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-9)
    assert saved["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
    assert saved["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    if metrics.meteor_unavailable():
        assert saved["METEOR"] is None and "METEOR skipped" in run.stderr
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        assert saved["METEOR"] == Meteor().compute_score(gts, res)[0]
    clip_mean = expected_scores(world)[2]
    assert saved["CLIPScore"] == pytest.approx(clip_mean, abs=1e-5) and 0 <= saved["RefCLIPScore"] <= 2.5
    line = run.stdout.strip()
    shown = [k for k, v in saved.items() if v is not None]
    assert [part.split(": ")[0] for part in line.split(" | ")] == shown
    assert float(line.split("CIDEr: ")[1].split(" |")[0]) == saved["CIDEr"]


def test_json_holds_only_the_metrics_asked(world, tmp_path):
    out, per_image = tmp_path / "scores.json", tmp_path / "per_image.json"
    run = run_cli(world, "--metrics", "bleu,rouge", "--json", str(out), "--per-image", str(per_image))
    assert run.returncode == 0, run.stderr
    assert list(json.loads(out.read_text())) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"]
    assert run.stdout.startswith("BLEU-1: ") and "CIDEr" not in run.stdout
    entry = json.loads(per_image.read_text())["dog"]
    assert sorted(entry) == ["bleu-1", "bleu-2", "bleu-3", "bleu-4", "caption", "rouge-l"]
    bad = run_cli(world, "--metrics", "spice")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --metrics 'spice'")


def test_references_in_karpathy_and_deepfashion_formats(world, tmp_path):
    """The same references as the COCO file, in the other formats: the same scores; --split picks the images."""
    files = {os.path.splitext(n)[0]: n for n in os.listdir(world["images"])}
    keys = list(CAPTIONS)
    data = {"images": [{"filename": files[k], "split": "val" if i < 3 else "train",
                        "sentences": [{"raw": c} for c in CAPTIONS[k]]} for i, k in enumerate(keys)]}
    (tmp_path / "karpathy.json").write_text(json.dumps(data))
    val = {k: PREDICTIONS[k] for k in keys[:3]}
    result = metrics.evaluate(val, str(tmp_path / "karpathy.json"), world["images"],
                              metrics.Scoring(clip=world["clip"]))
    assert set(result["per_image"]) == set(val)  # the default split of a file with splits is val
    assert result["CIDEr"] == pytest.approx(metrics.cider(val, CAPTIONS)[0], abs=1e-12)
    every = metrics.evaluate(dict(PREDICTIONS), str(tmp_path / "karpathy.json"), world["images"],
                             metrics.Scoring(clip=world["clip"], metrics=("cider",)), split="all")
    assert every["CIDEr"] == pytest.approx(metrics.cider(PREDICTIONS, CAPTIONS)[0], abs=1e-12)
    assert "CLIPScore" not in every
    plain = {files[k]: CAPTIONS[k] for k in keys}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    same = metrics.evaluate(dict(PREDICTIONS), str(tmp_path / "plain.json"), world["images"],
                            metrics.Scoring(clip=world["clip"]))
    assert same["CIDEr"] == pytest.approx(expected_scores(world)[0], abs=1e-12)
    with pytest.raises(UserError, match="keys do not match"):
        metrics.evaluate(dict(PREDICTIONS), str(tmp_path / "plain.json"), world["images"],
                         metrics.Scoring(clip=world["clip"]), split="val", val_fraction=0.5)
