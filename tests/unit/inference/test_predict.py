"""p2_inference.py / hw3_2.sh end to end on synthetic images with a tiny checkpoint, and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hw3.models import captioner
from hw3.util import safe_load
from hw3.models import decoding, search
from hw3.models.decoding import DecodingSettings
from hw3.inference import predict
from hw3.data.images import load_rgb
from hw3.util.errors import UserError
from hw3.models.gpt2 import Config
from tiny_models import CAPTION_ENCODER, ending_gpt2, randomize_trainable, save_course_format
from hw3 import REPO_ROOT as ROOT

pytestmark = pytest.mark.filterwarnings("ignore:skipping 1 non-image file")  # the fixture's notes.txt
SETTINGS = dict(method="beam", beam_size=3, max_len=16, length_penalty=1.0, no_repeat_ngram=2)


def write_images(folder, count: int = 7) -> list:
    """Images in the modes a test folder may hold: RGB/grayscale JPEG, RGBA/palette PNG, odd sizes."""
    os.makedirs(str(folder), exist_ok=True)
    rng = np.random.RandomState(0)
    names = []
    for i in range(count):
        h, w = 20 + 7 * i, 48 - 3 * i
        pixels = (rng.rand(h, w, 3) * 255 * (0.3 + 0.1 * i)).astype(np.uint8)
        image = Image.fromarray(pixels)
        name, mode = [("%d_rgb.jpg", "RGB"), ("img%d.png", "RGBA"), ("gray_%d.jpg", "L"), ("pal%d.png", "P")][i % 4]
        image = image.convert(mode)
        image.save(os.path.join(str(folder), name % i))
        names.append(name % i)
    return sorted(names)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2")
    weights = save_course_format(ending_gpt2(), root / "decoder_model.bin")
    model = captioner.build_captioner(CAPTION_ENCODER, Config(checkpoint=weights))
    randomize_trainable(model.decoder)
    checkpoint = str(root / "ckpt" / "p2_best.pt")
    os.makedirs(os.path.dirname(checkpoint))
    captioner.save_checkpoint(checkpoint, model, extra={decoding.INFERENCE_KEY: dict(SETTINGS, chosen_on="test")})
    names = write_images(root / "images")
    (root / "images" / "notes.txt").write_text("not an image")
    return dict(root=root, weights=weights, checkpoint=checkpoint, names=names, images=str(root / "images"))


def reference_captions(setup, **settings) -> dict:
    """One image at a time through the captioner, no DataLoader; {key: caption}, or {key: [captions]} when
    settings ask for captions_per_image."""
    model, _ = captioner.load_captioner(setup["checkpoint"], setup["weights"])
    out = {}
    for name in setup["names"]:
        pixels = model.encoder.transform(load_rgb(os.path.join(setup["images"], name))).unsqueeze(0)
        key = os.path.splitext(name)[0]
        captions = search.decode_captions(model.generate(pixels, DecodingSettings(**settings), image_keys=[key]))
        out[key] = captions if "captions_per_image" in settings else captions[0]
    return out


def run(setup, output, *extra) -> int:
    return predict.main([setup["images"], str(output), setup["weights"], "--checkpoint", setup["checkpoint"],
                              "--num-workers", "0", "--device", "cpu"] + list(extra))


def test_every_image_captioned_once_equal_to_one_by_one(setup, tmp_path):
    out = tmp_path / "out" / "pred.json"
    with pytest.warns(UserWarning, match="notes.txt"):
        assert run(setup, out, "--batch-size", "3") == 0
    text = out.read_text()
    pred = json.loads(text)
    assert list(pred) == [os.path.splitext(n)[0] for n in setup["names"]]
    assert sum(text.count('"%s":' % key) for key in pred) == len(setup["names"])
    assert pred == reference_captions(setup, **SETTINGS)  # the checkpoint's saved settings are the defaults
    assert len(set(pred.values())) > 1 and all(isinstance(c, str) and c == c.strip() for c in pred.values())
    assert [p.name for p in out.parent.iterdir()] == ["pred.json"]  # no temporary file left behind


def test_command_line_settings_override_the_checkpoint(setup, tmp_path):
    out = tmp_path / "greedy.json"
    run(setup, out, "--method", "greedy", "--max-len", "6", "--no-repeat-ngram", "0", "--batch-size", "4")
    assert json.loads(out.read_text()) == reference_captions(setup, method="greedy", max_len=6, no_repeat_ngram=0)


def with_config(setup, tmp_path, name: str, **changes) -> dict:
    """A copy of the fixture's checkpoint whose JSON has `changes` (None removes a key)."""
    import shutil

    checkpoint = str(tmp_path / (name + ".pt"))
    shutil.copy(setup["checkpoint"], checkpoint)
    meta = json.loads(open(captioner.config_path(setup["checkpoint"])).read())
    for key, value in changes.items():
        meta.pop(key, None) if value is None else meta.__setitem__(key, value)
    (tmp_path / (name + ".json")).write_text(json.dumps(meta))
    return dict(setup, checkpoint=checkpoint)


def test_without_recommended_settings_it_decodes_with_the_readme_defaults(setup, tmp_path, capsys):
    """Training's validation decoding (the old "generation" record) is not an inference setting: ignored."""
    plain = with_config(setup, tmp_path, "plain", inference=None,
                        generation=dict(method="greedy", beam_size=1, max_len=3))
    out = tmp_path / "pred.json"
    run(plain, out)
    assert json.loads(out.read_text()) == reference_captions(plain, **decoding.DECODE_DEFAULTS)
    said = capsys.readouterr().err
    assert "decoding: method=beam, beam_size=3, max_len=30" in said and "all from the README defaults" in said


def test_beam_size_alone_means_beam_search_with_that_many_beams(setup, tmp_path, capsys):
    greedy = with_config(setup, tmp_path, "greedy", inference=dict(SETTINGS, method="greedy", chosen_on="test"))
    alone, explicit = tmp_path / "alone.json", tmp_path / "explicit.json"
    run(greedy, alone, "--beam-size", "5")
    assert "method=beam, beam_size=5" in capsys.readouterr().err
    run(greedy, explicit, "--method", "beam", "--beam-size", "5")
    expected = reference_captions(greedy, **dict(SETTINGS, beam_size=5))
    assert json.loads(alone.read_text()) == json.loads(explicit.read_text()) == expected
    assert expected != reference_captions(greedy, **dict(SETTINGS, method="greedy"))  # the flag changed something
    with pytest.raises(UserError, match="--method greedy contradicts --beam-size"):
        run(greedy, tmp_path / "o.json", "--method", "greedy", "--beam-size", "5")


@pytest.mark.parametrize("inference,message", [
    (dict(SETTINGS, method="nucleus", chosen_on="x"), "method must be beam, greedy or sample"),
    (dict(SETTINGS, method="sample", temperature=0, chosen_on="x"), "temperature must be > 0"),
    (dict(SETTINGS, beam_size=2.5, chosen_on="x"), "beam_size must be a whole number"),
    (dict(SETTINGS, max_len=0, chosen_on="x"), "max-len must be >= 1"),
    (dict(SETTINGS), "chosen_on"),
    ("beam", "must hold method"),
])
def test_bad_recommended_settings_are_refused_naming_the_file(setup, tmp_path, inference, message):
    bad = with_config(setup, tmp_path, "bad", inference=inference)
    with pytest.raises(UserError, match=message) as err:
        run(bad, tmp_path / "o.json")
    assert "bad.json" in str(err.value)
    assert not (tmp_path / "o.json").exists()


def test_cli_with_workers_in_a_subprocess(setup, tmp_path):
    out = tmp_path / "pred.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "p2_inference.py"), setup["images"], str(out),
                           setup["weights"], "--checkpoint", setup["checkpoint"], "--num-workers", "2",
                           "--batch-size", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "captioned 7 images" in proc.stderr
    assert json.loads(out.read_text()) == reference_captions(setup, **SETTINGS)


def test_hw3_2_sh_fails_cleanly_without_the_default_checkpoint(setup, tmp_path):
    if os.path.isfile(predict.DEFAULT_CHECKPOINT):
        pytest.skip("a real checkpoint is installed; its encoder weights may be cached")
    out = tmp_path / "pred.json"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "hw3_2.sh"), setup["images"], str(out), setup["weights"]],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")
    assert not out.exists()


def test_undecodable_image_is_named_and_nothing_is_written(setup, tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = tmp_path / "pred.json"
    out.write_text("previous results")
    for workers in ("0", "2"):
        with pytest.raises(UserError, match="broken.jpg"):
            predict.main([str(folder), str(out), setup["weights"], "--checkpoint", setup["checkpoint"],
                               "--num-workers", workers])
    assert out.read_text() == "previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "pred.json"]


def test_input_errors(setup, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        run(dict(setup, images=str(empty)), tmp_path / "o.json")
    with pytest.raises(UserError, match="not found or not a directory"):
        run(dict(setup, images=str(tmp_path / "missing")), tmp_path / "o.json")
    twins = tmp_path / "twins"
    write_images(twins, 1)
    Image.new("RGB", (8, 8)).save(str(twins / "0_rgb.png"))
    with pytest.raises(UserError, match="0_rgb.jpg and 0_rgb.png"):
        run(dict(setup, images=str(twins)), tmp_path / "o.json")
    with pytest.raises(UserError, match="is a directory"):
        run(setup, tmp_path)
    with pytest.raises(UserError, match="no_decoder.bin"):
        run(dict(setup, weights=str(tmp_path / "no_decoder.bin")), tmp_path / "o.json")
    with pytest.raises(UserError, match="checkpoint not found"):
        run(dict(setup, checkpoint=str(tmp_path / "none.pt")), tmp_path / "o.json")
    with pytest.raises(UserError, match="beam-size"):
        run(setup, tmp_path / "o.json", "--beam-size", "0")
    assert not (tmp_path / "o.json").exists()


def test_mismatched_checkpoint_is_refused(setup, tmp_path):
    state = safe_load.load_tensors(setup["checkpoint"])
    state.pop(sorted(state)[0])
    bad = str(tmp_path / "bad.pt")
    torch.save(state, bad)
    (tmp_path / "bad.json").write_text(open(captioner.config_path(setup["checkpoint"])).read())
    with pytest.raises(UserError, match="bad.pt does not match its config"):
        run(dict(setup, checkpoint=bad), tmp_path / "o.json")


def test_captions_file_split_captions_only_that_split(setup, tmp_path):
    """--captions FILE --split val: only the val images of the folder, keyed as p2_evaluate.py --split val scores."""
    from hw3.evaluation import metrics
    from hw3.data import caption_files

    captions = tmp_path / "captions.json"  # DeepFashion-style: {file name: paragraph}, no splits
    captions.write_text(json.dumps({n: "A picture. It is small." for n in setup["names"]}))
    references = metrics.load_references(str(captions), split="val", val_fraction=0.5)[0]
    assert 0 < len(references) < len(setup["names"])
    out = tmp_path / "pred.json"
    assert run(setup, out, "--captions", str(captions), "--split", "val", "--val-fraction", "0.5") == 0
    pred = json.loads(out.read_text())
    assert sorted(pred) == sorted(references)
    everything = reference_captions(setup, **SETTINGS)
    assert pred == {k: everything[k] for k in pred}
    whole = caption_files.load_captions(str(captions), setup["images"]).names  # no --split: the whole file
    assert run(setup, out, "--captions", str(captions)) == 0 and len(json.loads(out.read_text())) == len(whole)
    with pytest.raises(UserError, match="--split val needs --captions FILE"):
        run(setup, out, "--split", "val")


SAMPLING = ["--method", "sample", "--temperature", "1.5", "--top-k", "40", "--top-p", "0.95", "--seed", "7",
            "--max-len", "12"]


def test_sampled_captions_are_the_same_for_any_batch_size(setup, tmp_path, capsys):
    outputs = []
    for size in ("1", "2", "5"):
        out = tmp_path / ("pred%s.json" % size)
        assert run(setup, out, "--batch-size", size, *SAMPLING) == 0
        outputs.append(json.loads(out.read_text()))
    assert outputs[0] == outputs[1] == outputs[2]
    said = capsys.readouterr().err
    assert "decoding: method=sample, max_len=12, min_len=1, no_repeat_ngram=2, temperature=1.5, top_k=40, " \
           "top_p=0.95, seed=7, captions_per_image=1 (from the command line: max_len, method, seed, temperature, " \
           "top_k, top_p; min_len: the README default (not in the checkpoint); the rest from p2_best.json (chosen " \
           "on test))" in said
    settings = dict(method="sample", temperature=1.5, top_k=40, top_p=0.95, seed=7, max_len=12, no_repeat_ngram=2)
    assert outputs[0] == reference_captions(setup, **settings)
    assert len(set(outputs[0].values())) == len(outputs[0])
    out = tmp_path / "seed8.json"
    run(setup, out, *(SAMPLING[:-4] + ["--seed", "8", "--max-len", "12"]))
    assert json.loads(out.read_text()) != outputs[0]


def test_coco_output_is_a_training_file(setup, tmp_path):
    """--format coco --captions-per-image 3: every image with its 3 draws, read back by caption_files and p2_train."""
    from hw3.data import caption_files
    from hw3.training.cli import parse_config
    from hw3.training.data import load_splits

    out = tmp_path / "teacher.json"
    assert run(setup, out, "--format", "coco", "--captions-per-image", "3", "--batch-size", "4", *SAMPLING) == 0
    data = json.loads(out.read_text())
    assert [i["file_name"] for i in data["images"]] == setup["names"]
    assert data["info"]["decoding"]["captions_per_image"] == 3 and data["info"]["decoding"]["seed"] == 7
    written = caption_files.read_captions(str(out))
    assert written.format == "coco"
    settings = dict(method="sample", temperature=1.5, top_k=40, top_p=0.95, seed=7, max_len=12, no_repeat_ngram=2,
                    captions_per_image=3)
    expected = reference_captions(setup, **settings)
    assert dict(written.captions) == {n: expected[os.path.splitext(n)[0]] for n in setup["names"]}
    loaded = caption_files.load_captions(str(out), setup["images"], clean=False)
    assert loaded.names == setup["names"] and all(len(c) == 3 for c in loaded.captions)
    config = parse_config(["--train-json", str(out), "--train-images", setup["images"], "--val-json", str(out),
                           "--val-images", setup["images"], "--val-fraction", "0.5",
                           "--decoder-weights", setup["weights"], "--out", str(tmp_path / "train")])
    train, val = load_splits(config.data)
    assert sorted(train.names + val.names) == setup["names"] and all(len(c) == 3 for c in train.captions)
    one = tmp_path / "one.json"  # the first draw of three is the single caption of the same seed
    assert run(setup, one, *SAMPLING) == 0
    assert json.loads(one.read_text()) == {k: v[0] for k, v in expected.items()}
    beams = tmp_path / "beams.json"
    assert run(setup, beams, "--format", "coco", "--captions-per-image", "2", "--beam-size", "3") == 0
    best = reference_captions(setup, **dict(SETTINGS, captions_per_image=2))
    assert dict(caption_files.read_captions(str(beams)).captions) == {n: best[os.path.splitext(n)[0]]
                                                                for n in setup["names"]}


@pytest.mark.parametrize("extra,message", [
    (["--captions-per-image", "2", "--method", "sample"], "--captions-per-image 2 needs --format coco"),
    (["--format", "coco", "--captions-per-image", "2", "--method", "greedy"], "greedy search gives one caption"),
    (["--format", "coco", "--captions-per-image", "4"], "--captions-per-image 4 exceeds --beam-size 3"),
    (["--format", "coco", "--captions-per-image", "0", "--method", "sample"], "--captions-per-image must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--method", "beam", "--top-k", "5"], "--method beam contradicts --top-k"),
])
def test_sampling_and_output_errors_are_one_line_before_any_work(setup, tmp_path, extra, message):
    with pytest.raises(UserError, match=message) as err:
        run(setup, tmp_path / "o.json", *extra)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o.json").exists()


def test_captions_cut_at_max_len_are_counted(setup, tmp_path, capsys):
    """A caption that reaches --max-len without its end token is cut: run() counts them and stderr says so; with
    room enough none is, and nothing is said."""
    enough = predict.run([setup["images"], str(tmp_path / "long.json"), setup["weights"], "--checkpoint",
                               setup["checkpoint"], "--num-workers", "0", "--max-len", "40"])
    assert enough == dict(captions=len(setup["names"]), cut=0, max_len=40)
    assert "captions cut at" not in capsys.readouterr().err
    short = predict.run([setup["images"], str(tmp_path / "short.json"), setup["weights"], "--checkpoint",
                              setup["checkpoint"], "--num-workers", "0", "--max-len", "2", "--min-len", "2"])
    assert short == dict(captions=len(setup["names"]), cut=len(setup["names"]), max_len=2)
    assert "%d of %d captions cut at 2 tokens (no end token)" % ((len(setup["names"]),) * 2) in \
        capsys.readouterr().err
