"""One rule for finding images in every entry point: a Karpathy file whose images sit under `filepath`
sub-folders and a COCO file whose file_name holds a sub-folder, read by caption_files, p2_inference, p2_evaluate,
p3_visualize and run_all's checks alike; paths that leave the image folder, empty references and a Latin-1 file
refused or said in one line; a refused command leaves no folder it would have created."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from hw3.models import captioner
from hw3.evaluation import metrics
from hw3.data import caption_files
from hw3.evaluation import evaluate
from hw3.inference import predict
from hw3.training import trainer
from hw3.attention import visualize
from hw3.pipeline import checks, run_all, runner
from hw3.util.errors import UserError, run_main
from hw3.models.gpt2 import Config
from miniworld import demo
from tiny_models import TINY_ENCODER, tiny_gpt2

# (sub-folder, file name, Karpathy split); the val images sit in two sub-folders, one of them nested
LAYOUT = [("train2014", "t%d.png" % i, "train") for i in range(4)] + [
    ("train2014", "r0.png", "restval"), ("val2014", "v0.png", "val"), ("val2014/more", "v1.png", "val"),
    ("test2014", "x0.png", "test")]
SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def karpathy(layout, **changes) -> dict:
    """A Karpathy split file with `filepath` sub-folders, two captions an image."""
    images = [dict(filepath=folder, filename=name, split=split, imgid=i,
                   sentences=[dict(raw="a %s picture" % name[:2]), dict(raw="picture number %d" % i)])
              for i, (folder, name, split) in enumerate(layout)]
    for index, fields in changes.items():
        images[int(index.split("_")[1])].update(fields)
    return dict(dataset="coco", images=images)


def coco(names) -> dict:
    return dict(images=[dict(id=i + 1, file_name=n) for i, n in enumerate(names)],
                annotations=[dict(id=i + 1, image_id=i + 1, caption="a picture of %s" % os.path.basename(n))
                             for i, n in enumerate(names)])


def write(path, obj) -> str:
    with open(str(path), "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def names_of(split: str):
    return ["%s/%s" % (folder, name) for folder, name, s in LAYOUT if SPLIT_OF[s] == split]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The image root (no image at its top), the Karpathy file and a tiny captioner checkpoint."""
    root = tmp_path_factory.mktemp("paths")
    images = root / "images"
    for k, (folder, name, _) in enumerate(LAYOUT):
        os.makedirs(str(images / folder), exist_ok=True)
        Image.new("RGB", (32, 32), (30 * k % 256, 200 - 20 * k, 90)).save(str(images / folder / name))
    weights = tiny_gpt2(root / "decoder_model.bin", n_layer=2, n_embd=64, n_head=2, n_positions=32)
    checkpoint = str(root / "p2.pt")
    captioner.save_checkpoint(checkpoint, captioner.build_captioner(TINY_ENCODER, Config(checkpoint=weights)))
    return dict(root=str(root), images=str(images), decoder=weights, checkpoint=checkpoint,
                karpathy=write(root / "dataset_coco.json", karpathy(LAYOUT)))


def run(main, argv, capsys) -> tuple:
    """(exit code, stderr) of a script's main as its command line runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        run_main(lambda: main(argv))
    return ended.value.code, capsys.readouterr().err


def refused(main, argv, capsys, fragment: str) -> str:
    """The one line a refused command prints, checked to name `fragment`."""
    code, err = run(main, argv, capsys)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and fragment in err.strip().splitlines()[-1], err[-2000:]
    return err.strip().splitlines()[-1]


def infer_argv(data, out, *extra):
    return [data["images"], out, data["decoder"], "--checkpoint", data["checkpoint"], "--device", "cpu",
            "--num-workers", "0", "--max-len", "3"] + list(extra)


def p3_argv(data, out, *extra):
    return ["--checkpoint", data["checkpoint"], "--decoder", data["decoder"], "--out", out, "--device", "cpu",
            "--max-len", "3"] + list(extra)


# ----------------------------------------------------------------------------------------------- the one rule

def test_a_caption_file_and_a_bare_folder_find_the_same_images(data):
    found = {s: caption_files.find_images(data["images"], data["karpathy"], split=s) for s in ("train", "val", "test")}
    assert {s: sorted(n) for s, n in found.items()} == {s: sorted(names_of(s)) for s in found}
    assert sorted(caption_files.find_images(data["images"])) == sorted(n for names in found.values() for n in names)
    coco_file = write(os.path.join(data["root"], "val_coco.json"), coco(names_of("val")))
    assert caption_files.find_images(data["images"], coco_file) == sorted(names_of("val"))


def test_two_images_of_one_key_in_sub_folders_are_refused(tmp_path):
    for folder in ("a", "b"):
        os.makedirs(str(tmp_path / folder))
        Image.new("RGB", (8, 8)).save(str(tmp_path / folder / "same.png"))
    with pytest.raises(UserError, match="would share the key 'same'"):
        caption_files.find_images(str(tmp_path))


def test_inference_captions_the_sub_folder_images(data, tmp_path):
    out = str(tmp_path / "val.json")
    assert predict.main(infer_argv(data, out, "--captions", data["karpathy"])) == 0  # val by default
    assert sorted(json.load(open(out))) == sorted(caption_files.image_key(n) for n in names_of("val"))
    assert predict.main(infer_argv(data, out)) == 0  # no caption file: the folder and its sub-folders
    assert len(json.load(open(out))) == len(LAYOUT)


def test_evaluation_scores_the_sub_folder_images(data, tmp_path):
    right = {caption_files.image_key(n): "a %s picture" % caption_files.image_key(n) for n in names_of("val")}
    swapped = dict(zip(right, reversed(list(right.values()))))
    scores = str(tmp_path / "scores.json")
    cider = []
    for predictions in (right, swapped):
        assert evaluate.main(["--pred_file", write(tmp_path / "pred.json", predictions), "--images_root",
                                 data["images"], "--annotation_file", data["karpathy"], "--metrics", "cider",
                                 "--json", scores]) == 0
        cider.append(json.load(open(scores))["CIDEr"])
    assert cider[0] > cider[1]  # each image scored against its own references


def test_p3_draws_the_sub_folder_images_and_the_scored_ones(data, tmp_path):
    out = str(tmp_path / "p3")
    assert visualize.main(p3_argv(data, out, "--images", data["images"])) == 0
    drawn = sorted(e["image"] for e in json.load(open(os.path.join(out, "attention.json")))["figures"])
    assert drawn == sorted(name for _, name, _ in LAYOUT)
    scores = write(tmp_path / "per_image.json", {"v0": {"clipscore": 0.2}, "v1": {"clipscore": 0.7},
                                                 "t1": {"clipscore": 0.5}})
    assert visualize.main(p3_argv(data, str(tmp_path / "bw"), "--images", data["images"],
                                     "--from-scores", scores)) == 0
    figures = json.load(open(str(tmp_path / "bw" / "attention.json")))["figures"]
    assert [(e["image"], e["score"]) for e in figures] == [("v1.png", 0.7), ("v0.png", 0.2)]


def run_all_argv(data, captions, out):
    models = os.path.join(demo.MODELS, "tiny_clip")
    return ["--captions", captions, "--images", data["images"], "--out", out, "--with", "compare", "--device", "cpu",
            "--workers", "0", "--encoder", TINY_ENCODER, "--clip-model", models + ".json", "--clip-pretrained",
            models + ".pt"]


def test_run_all_checks_pass_on_sub_folders_and_count_each_image_once(data, tmp_path, monkeypatch, capsys):
    ran, counts = [], []
    monkeypatch.setattr(runner, "run_stage", lambda ctx, name, function, selected: ran.append(name))
    real = checks.check_images
    monkeypatch.setattr(checks, "check_images", lambda paths: counts.append(real(paths)) or counts[-1])
    code, err = run(run_all.main, run_all_argv(data, data["karpathy"], str(tmp_path / "out")), capsys)
    assert code == 0, err[-2000:]
    assert "compare" in ran
    assert counts == [len(names_of("train")) + len(names_of("val"))]  # the test split is read by no stage


# ----------------------------------------------------------------------------------------------- escaping paths

ESCAPES = [
    ("karpathy-dotdot", lambda: karpathy(LAYOUT, image_5=dict(filepath="../../elsewhere")),
     "images[5] (filepath '../../elsewhere', filename 'v0.png') leaves the image folder"),
    ("karpathy-absolute", lambda: karpathy(LAYOUT, image_5=dict(filepath="/etc")),
     "images[5] (filepath '/etc', filename 'v0.png') leaves the image folder (an absolute path)"),
    ("karpathy-absolute-filename", lambda: karpathy(LAYOUT, image_6=dict(filename="/etc/hostname")),
     "images[6] (filepath 'val2014/more', filename '/etc/hostname') leaves the image folder"),
    ("coco-dotdot", lambda: coco(["val2014/v0.png", "val2014/../../elsewhere/v1.png"]),
     "images[1] (file_name 'val2014/../../elsewhere/v1.png') leaves the image folder"),
    ("coco-absolute", lambda: coco(["/etc/hostname"]), "images[0] (file_name '/etc/hostname') leaves"),
    ("plain-dotdot", lambda: {"val2014/v0.png": "a picture", "../elsewhere/v1.png": ["a picture"]},
     "key '../elsewhere/v1.png' leaves the image folder"),
    ("deepfashion-absolute", lambda: {"/etc/hostname": "The upper clothing has long sleeves."},
     "key '/etc/hostname' leaves the image folder"),
]


@pytest.mark.parametrize("content, fragment", [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_a_path_leaving_the_image_folder_is_refused_naming_the_entry(tmp_path, content, fragment):
    path = write(tmp_path / "captions.json", content())
    with pytest.raises(UserError) as err:
        caption_files.read_captions(path)
    assert fragment in str(err.value) and path in str(err.value)


def test_every_entry_point_refuses_an_escaping_path_and_creates_nothing(data, tmp_path, capsys):
    escaping = write(tmp_path / "escaping.json", karpathy(LAYOUT, image_5=dict(filepath="../../elsewhere")))
    fragment = "filepath '../../elsewhere'"
    new = tmp_path / "new"
    refused(predict.main, infer_argv(data, str(new / "a" / "pred.json"), "--captions", escaping), capsys,
            fragment)
    refused(evaluate.main, ["--pred_file", write(tmp_path / "pred.json", {}), "--images_root", data["images"],
                               "--annotation_file", escaping, "--metrics", "cider"], capsys, fragment)
    refused(trainer.main, ["--train-json", escaping, "--train-images", data["images"], "--val-json", escaping,
                            "--val-images", data["images"], "--decoder-weights", data["decoder"], "--encoder",
                            TINY_ENCODER, "--device", "cpu", "--workers", "0", "--no-clipscore",
                            "--out", str(new / "b" / "run"), "--feature-cache", str(new / "c" / "cache")],
            capsys, fragment)
    refused(run_all.main, run_all_argv(data, escaping, str(new / "d" / "out")), capsys, fragment)
    assert not new.exists()


# ----------------------------------------------------------------------------------------------- bad input

def test_empty_references_are_left_out_and_counted_once_per_file(data, tmp_path, capsys):
    with_empty = karpathy(LAYOUT, image_5=dict(sentences=[dict(raw=""), dict(raw="  . "), dict(raw="a v0 picture")]),
                          image_0=dict(sentences=[dict(raw=" ")]))
    path = write(tmp_path / "empty.json", with_empty)
    capsys.readouterr()
    val = caption_files.load_captions(path, data["images"], default_split="val")
    train = caption_files.load_captions(path, data["images"], default_split="train")
    references, _ = metrics.load_references(path, default_split="val")
    err = capsys.readouterr().err
    assert err.count("3 empty captions in caption file %s left out" % path) == 1
    assert err.count("empty captions") == 1  # the file was read three times (twice as captions, once as references)
    assert val.references[val.names.index("val2014/v0.png")] == ["a v0 picture"]
    assert references["v0"] == ["a v0 picture"]
    assert "train2014/t0.png" not in train.names  # its only caption was empty: the image goes, and that is said too
    assert "1 image(s) without a caption left out" in err


def test_an_image_whose_references_are_all_empty_is_left_out_of_scoring_too(data, tmp_path, capsys):
    """p2_inference --captions leaves it out, so p2_evaluate must too, not refuse the predictions."""
    path = write(tmp_path / "empty.json", karpathy(LAYOUT, image_5=dict(sentences=[dict(raw=" "), dict(raw="")])))
    predictions = str(tmp_path / "pred.json")
    assert predict.main(infer_argv(data, predictions, "--captions", path)) == 0
    assert list(json.load(open(predictions))) == ["v1"]
    assert evaluate.main(["--pred_file", predictions, "--images_root", data["images"], "--annotation_file", path,
                             "--metrics", "cider"]) == 0
    assert "1 image(s) without a caption left out: v0" in capsys.readouterr().err


def test_a_latin1_caption_file_is_named_as_an_encoding_error(data, tmp_path, capsys):
    text = json.dumps({"val2014/v0.png": "un caf\u00e9 au lait"}, ensure_ascii=False)
    path = tmp_path / "latin1.json"
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(UserError) as err:
        caption_files.read_captions(str(path))
    assert "is not UTF-8 text" in str(err.value) and "byte %d is 0xe9" % offset in str(err.value)
    assert "not valid JSON" not in str(err.value) and str(path) in str(err.value)
    line = refused(evaluate.main, ["--pred_file", write(tmp_path / "pred.json", {"v0": "a"}), "--images_root",
                                      data["images"], "--annotation_file", str(path), "--metrics", "cider"],
                   capsys, "is not UTF-8 text")
    assert str(path) in line


def test_refused_commands_leave_no_new_folder(data, tmp_path, capsys):
    """Each refusal comes after its output folders were checked: none of them may be left behind, empty."""
    missing = write(tmp_path / "missing.json", coco(["%s/%s" % (f, n) for f, n, _ in LAYOUT] + ["val2014/absent.png"]))
    new = tmp_path / "new"
    refused(trainer.main, ["--train-json", missing, "--train-images", data["images"], "--val-json", missing,
                            "--val-images", data["images"], "--decoder-weights", data["decoder"], "--encoder",
                            TINY_ENCODER, "--device", "cpu", "--workers", "0", "--no-clipscore",
                            "--out", str(new / "run"), "--feature-cache", str(new / "cache" / "deep")],
            capsys, "absent.png")
    refused(run_all.main, run_all_argv(data, missing, str(new / "all" / "out")), capsys, "absent.png")
    refused(predict.main, infer_argv(data, str(new / "pred" / "out.json"), "--captions", missing), capsys,
            "absent.png")
    refused(visualize.main, p3_argv(data, str(new / "p3" / "figures"), "--images", str(tmp_path / "nothing")),
            capsys, "nothing")
    assert not new.exists()
