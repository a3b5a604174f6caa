"""p2_data's caption reader: the four formats (COCO, Karpathy, DeepFashion-MultiModal, plain), splits (restval,
the deterministic split of a file without splits), the refusals, and the caption lengths DeepFashion needs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from hw3.data import caption_files, datasets
from hw3.util.errors import UserError
from hw3.data.tokenizer import BPETokenizer
from hw3 import REPO_ROOT as ROOT

# Written in DeepFashion-MultiModal's template style (the dataset itself is not downloadable here): a short, a usual
# and the richest paragraph the template can make (every shape, fabric and colour attribute present).
DEEPFASHION_PARAGRAPHS = [
    "The lower clothing is of long length. The fabric is cotton and it has plaid patterns.",
    "His sweater has long sleeves, cotton fabric and stripe patterns. The neckline of it is lapel. The gentleman "
    "wears a long pants. The pants are with cotton fabric and solid color patterns.",
    "The upper clothing has long sleeves, cotton fabric and solid color patterns. The neckline of it is v-shape. The "
    "lower clothing is of long length. The fabric is denim and it has solid color patterns. This lady also wears an "
    "outer clothing, with cotton fabric and complicated patterns. This female is wearing a ring on her finger. This "
    "female has neckwear.",
    "The upper clothing has long sleeves, chiffon fabric and floral patterns. The neckline of it is v-shape and it "
    "does not cover the navel. The lower clothing is of three-point length. The fabric is denim and it has lattice "
    "patterns. This lady also wears an outer clothing, with knitting fabric and complicated patterns, and it is a "
    "cardigan. This female wears a hat and glasses. There is a neckwear around her neck. There is an accessory on "
    "her wrist. This woman is wearing a ring on her finger. She has a belt. Her socks are visible and she wears "
    "leggings.",
]
DEEPFASHION_MAX_TOKENS = 160  # README's --max-caption-tokens for DeepFashion


def deepfashion_names(count: int):
    kinds = ["MEN-Denim", "WOMEN-Dresses", "WOMEN-Tees_Tanks", "MEN-Shirts_Polos"]
    return ["%s-id_%08d-01_%d_%s.jpg" % (kinds[i % 4], 80 + i, 1 + i % 7, ("front", "full", "additional")[i % 3])
            for i in range(count)]


def write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def karpathy(images):
    """A Karpathy split file: [(filename, split, [captions])...], with the fields Flickr8k's file has."""
    return {"dataset": "flickr8k", "images": [
        {"filename": name, "imgid": i, "split": split, "sentids": list(range(len(caps))),
         "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": j} for j, c in enumerate(caps)]}
        for i, (name, split, caps) in enumerate(images)]}


KARPATHY = [("b.jpg", "train", ["A dog runs.", "a brown dog"]), ("a.jpg", "restval", ["A cat sleeps."]),
            ("c.jpg", "val", ["Two birds.", "birds on a wire"]), ("d.jpg", "test", ["A red car."]),
            ("e.jpg", "train", ["A boat."])]


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"] + deepfashion_names(40):
        Image.new("RGB", (8, 8), (len(name) * 5 % 255, 90, 30)).save(str(images / name))
    return images


# ----------------------------------------------------------------------------------------------- formats

def test_each_format_is_recognised_by_its_content(tmp_path):
    coco = {"images": [{"file_name": "a.jpg", "id": 1}], "annotations": [{"image_id": 1, "caption": "A cat."}]}
    cases = [(coco, "coco", {"a.jpg": ["A cat."]}, False),
             (karpathy(KARPATHY), "karpathy", {n: c for n, _, c in KARPATHY}, True),
             ({"x.jpg": DEEPFASHION_PARAGRAPHS[0]}, "deepfashion", {"x.jpg": [DEEPFASHION_PARAGRAPHS[0]]}, False),
             ({"x.jpg": "one", "y.jpg": ["two", "three"]}, "plain", {"x.jpg": ["one"], "y.jpg": ["two", "three"]},
              False)]
    for i, (data, kind, captions, has_splits) in enumerate(cases):
        read = caption_files.read_captions(write(tmp_path / ("f%d.json" % i), data))
        assert read.format == kind and dict(read.captions) == captions
        assert (read.splits is not None) == has_splits
    assert list(caption_files.read_captions(karpathy(KARPATHY)).captions) == [n for n, _, _ in KARPATHY]  # file order


def test_karpathy_splits_and_restval(folder):
    read = caption_files.read_captions(karpathy(KARPATHY))
    assert read.splits == {"b.jpg": "train", "a.jpg": "train", "c.jpg": "val", "d.jpg": "test", "e.jpg": "train"}
    for split, names in [("train", ["b.jpg", "a.jpg", "e.jpg"]), ("val", ["c.jpg"]), ("test", ["d.jpg"]),
                         ("all", ["b.jpg", "a.jpg", "c.jpg", "d.jpg", "e.jpg"])]:
        assert caption_files.split_names(read, split)[0] == names
    path = write(folder.parent / "k.json", karpathy(KARPATHY))
    train = caption_files.load_captions(path, str(folder), default_split="train")
    assert train.names == ["a.jpg", "b.jpg", "e.jpg"] and train.split == "train"  # restval trains, sorted
    assert train.captions[1] == ["a dog runs", "a brown dog"] and train.references[1] == ["A dog runs.", "a brown dog"]
    val = caption_files.load_captions(path, str(folder), default_split="val")
    assert val.names == ["c.jpg"] and val.keys() == ["c"]
    assert caption_files.load_captions(path, str(folder), split="all").names == ["a.jpg", "b.jpg", "c.jpg", "d.jpg",
                                                                                 "e.jpg"]


def test_karpathy_filepath_is_a_sub_folder(tmp_path):
    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (8, 8)).save(str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"))
    data = karpathy([("COCO_val2014_000000000042.jpg", "val", ["A plate of food."])])
    data["images"][0]["filepath"] = "val2014"
    caps = caption_files.load_captions(write(tmp_path / "coco_karpathy.json", data), str(tmp_path), default_split="val")
    assert caps.names == ["val2014/COCO_val2014_000000000042.jpg"] and caps.keys() == ["COCO_val2014_000000000042"]
    assert os.path.isfile(caps.path(0))


def test_a_file_without_splits_is_whole_unless_a_split_is_asked(folder):
    names = deepfashion_names(40)
    path = write(folder.parent / "captions.json", {n: DEEPFASHION_PARAGRAPHS[i % 4] for i, n in enumerate(names)})
    whole = caption_files.load_captions(path, str(folder),
                                        default_split="val")  # no splits: the default is the whole file
    assert whole.names == sorted(names) and whole.split == "all"
    course = caption_files.load_captions(path, str(folder))
    assert course.names == whole.names
    train = caption_files.load_captions(path, str(folder), split="train")
    val = caption_files.load_captions(path, str(folder), split="val")
    assert not set(train.names) & set(val.names) and sorted(train.names + val.names) == sorted(names)
    assert 0 < len(val.names) < len(train.names)
    half = caption_files.load_captions(path, str(folder), split="val", val_fraction=0.5)
    assert set(val.names) <= set(half.names)  # a larger fraction only adds images: each name's side is its own
    with pytest.raises(UserError, match="no test split"):
        caption_files.load_captions(path, str(folder), split="test")
    with pytest.raises(UserError, match="--val-fraction"):
        caption_files.load_captions(path, str(folder), split="val", val_fraction=1.0)


def test_the_split_is_stable_across_processes_and_machines():
    """The side of a name is a function of its bytes alone (SHA-256), not of Python's salted hash()."""
    names = deepfashion_names(1000)
    expected = [int(hashlib.sha256(n.encode("utf-8")).hexdigest()[:16], 16) < 0.2 * 2 ** 64 for n in names]
    assert [caption_files.in_val_fraction(n, 0.2) for n in names] == expected
    assert 150 < sum(expected) < 250
    code = ("import json, sys; from hw3.data import caption_files; names = json.loads(sys.stdin.read()); "
            "print(json.dumps([caption_files.in_val_fraction(n, 0.2) for n in names]))")
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(names), capture_output=True, text=True,
                             cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED=seed), timeout=120, check=True)
        assert json.loads(out.stdout) == expected


def test_split_counts_are_printed(folder, capsys):
    path = write(folder.parent / "captions.json", {n: "a shirt" for n in deepfashion_names(40)})
    train = caption_files.load_captions(path, str(folder), split="train", option="--train-split")
    err = capsys.readouterr().err
    assert "%d train, %d val" % (len(train.names), 40 - len(train.names)) in err and "--train-split" in err
    caption_files.load_captions(write(folder.parent / "k.json", karpathy(KARPATHY)), str(folder), default_split="train")
    assert "train split, 3 of 5 images (train 3, val 1, test 1)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("data, expected", [
    ([{"file_name": "a.jpg"}], "top level is a JSON list"),
    ({"a.jpg": 3}, "key 'a.jpg' holds a int"),
    ({"a.jpg": ["ok", 3]}, "key 'a.jpg' holds a list"),
    ({"images": [{"file_name": "a.jpg", "id": 1}]}, "COCO-style .images. but no .annotations."),
])
def test_unknown_format_names_the_file_and_what_was_expected(tmp_path, data, expected):
    path = write(tmp_path / "odd.json", data)
    with pytest.raises(UserError) as err:
        caption_files.read_captions(path)
    message = str(err.value)
    assert "odd.json" in message and "unknown caption format" in message
    assert all(kind in message for kind in ("coco", "karpathy", "deepfashion", "plain"))
    assert "\n" not in message
    assert re.search(expected, message), message


def test_karpathy_refusals(tmp_path):
    bad_split = karpathy([("a.jpg", "dev", ["x"])])
    with pytest.raises(UserError, match=r"images\[0\] \(a.jpg\) has split 'dev'; expected one of train, restval"):
        caption_files.read_captions(bad_split)
    with pytest.raises(UserError, match=r"images\[0\] \(a.jpg\) has an empty \"sentences\" list"):
        caption_files.read_captions(karpathy([("a.jpg", "train", [])]))
    with pytest.raises(UserError, match="no val images .--val-split val.; it has train 1"):
        caption_files.split_names(caption_files.read_captions(karpathy([("a.jpg", "train", ["x"])])), "val",
                                  option="--val-split")
    with pytest.raises(UserError, match="no images"):
        caption_files.read_captions({"images": []})


def test_empty_caption_lists_and_empty_captions(folder, capsys):
    with pytest.raises(UserError, match="image 'b.jpg' has an empty caption list"):
        caption_files.read_captions(write(folder.parent / "p.json", {"a.jpg": ["x"], "b.jpg": []}))
    with pytest.raises(UserError, match="empty JSON object"):
        caption_files.read_captions(write(folder.parent / "e.json", {}))
    path = write(folder.parent / "d.json", {"a.jpg": "A cat.", "b.jpg": "  "})  # a blank paragraph: left out, said
    assert caption_files.load_captions(path, str(folder)).names == ["a.jpg"]
    assert "1 image(s) without a caption left out" in capsys.readouterr().err


def test_a_caption_naming_an_absent_image(folder):
    path = write(folder.parent / "captions.json", {"a.jpg": "A cat.", "MEN-Denim-id_09999999-01_1_front.jpg": "x"})
    with pytest.raises(UserError) as err:
        caption_files.load_captions(path, str(folder))
    assert "1 image(s) of %s are not in %s, e.g. MEN-Denim-id_09999999-01_1_front.jpg" % (path, folder) \
        in str(err.value)


def test_two_images_with_one_prediction_key_are_refused(tmp_path):
    for name in ("x/a.jpg", "y/a.jpg"):
        os.makedirs(str(tmp_path / os.path.dirname(name)), exist_ok=True)
        Image.new("RGB", (8, 8)).save(str(tmp_path / name))
    with pytest.raises(UserError, match="share the prediction key 'a'"):
        caption_files.load_captions(write(tmp_path / "c.json", {"x/a.jpg": "one", "y/a.jpg": "two"}), str(tmp_path))


# ----------------------------------------------------------------------------------------------- lengths

def test_deepfashion_paragraphs_fit_the_documented_caption_length():
    """README trains DeepFashion with --max-caption-tokens 160: the template's richest paragraph is 126 tokens."""
    tokenizer = BPETokenizer()
    lengths = [len(tokenizer.encode(caption_files.clean_caption(p))) for p in DEEPFASHION_PARAGRAPHS]
    assert max(lengths) <= DEEPFASHION_MAX_TOKENS
    assert max(lengths) > 40  # the course's default would cut them
    cleaned = [caption_files.clean_caption(p) for p in DEEPFASHION_PARAGRAPHS]  # what training tokenises
    tokens, cut, longest = datasets.tokenize_captions([cleaned], tokenizer, 40)
    assert cut == sum(n > 40 for n in lengths) and longest == max(lengths)
    assert all(len(t) <= 40 for t in tokens[0])
    assert datasets.tokenize_captions([cleaned], tokenizer, DEEPFASHION_MAX_TOKENS)[1] == 0
