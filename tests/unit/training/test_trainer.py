"""p2_train.py, hw3.training and hw3.data on a tiny world: synthetic images, a random 1-block ViT and a random
2-block GPT-2."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hw3.data import caption_files, datasets, feature_cache
from hw3.models import registry
from hw3.models.decoding import DecodingSettings
from hw3.training import optimiser, trainer
from hw3.training.cli import parse_args
from hw3.training.data import CAPTION_LENGTH_STEP
from hw3.training.scst import baseline_of, sample_pairs, scst_epoch
from hw3.training.state import LATER_TRAJECTORY_OPTIONS, Dist, TrainingState, load_state
from hw3.training.config import TrainingConfig, to_argv
from hw3.util.errors import UserError
from tiny_models import TINY_ENCODER, tiny_gpt2
from hw3 import REPO_ROOT as ROOT

pytest.importorskip("transformers")
CAPTIONS = {"red.png": "a red square on a table", "blue.png": "two blue birds", "green.png": "a green field",
            "grid.png": "a black and white grid"}


def _image(name: str) -> Image.Image:
    a = np.zeros((32, 32, 3), np.uint8)
    if name == "red.png":
        a[8:24, 8:24] = (220, 30, 30)
    elif name == "blue.png":
        a[:, :] = (30, 40, 200)
    elif name == "green.png":
        a[16:, :] = (30, 180, 40)
    else:
        a[::4, :] = 255
        a[:, ::4] = 255
    return Image.fromarray(a)


def _coco(names, copies=1):
    images = [dict(id=i + 1, file_name=n) for i, n in enumerate(names)]
    annotations = [dict(id=100 * c + i, image_id=i + 1, caption=CAPTIONS[n].capitalize() + ".")
                   for c in range(copies) for i, n in enumerate(names)]
    return dict(info="tiny", licenses="", images=images, annotations=annotations)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on threads fighting over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2world")
    (root / "images").mkdir()
    for name in CAPTIONS:
        _image(name).save(root / "images" / name)
    (root / "train.json").write_text(json.dumps(_coco(list(CAPTIONS), copies=4)))
    (root / "val.json").write_text(json.dumps(_coco(list(CAPTIONS))))
    gpt2 = tiny_gpt2(root / "decoder_model.bin", n_layer=2, n_embd=64, n_head=2, n_positions=32)
    state = torch.load(gpt2)
    state["wte.weight"] = state["wte.weight"] * 25  # std 0.5: a frozen tied head that can put most mass on one token
    torch.save(state, gpt2)
    return root


def cli(world, out, *extra):
    return ["--train-json", str(world / "train.json"), "--train-images", str(world / "images"),
            "--val-json", str(world / "val.json"), "--val-images", str(world / "images"),
            "--decoder-weights", str(world / "decoder_model.bin"), "--encoder", TINY_ENCODER,
            "--out", str(out), "--workers", "0", "--device", "cpu", "--no-clipscore", "--batch-size", "8",
            "--val-max-len", "10", "--log-every", "1", "--warmup-steps", "2"] + list(extra)


def log_records(out):
    with open(os.path.join(str(out), "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------- targets

def test_caption_targets_follow_the_course():
    tokens = [[64, 9592, 351], [257], [5, 6, 7, 8, 9]]
    inputs, targets = datasets.caption_targets(tokens)
    K = 5 + 2
    for row, t in enumerate(tokens):  # the course's 11/27 note, written out
        expected_input = [50256] + t + [50256] + [50256] * (K - len(t) - 2)
        expected_target = t + [50256] + [-100] * (K - len(t) - 1)
        assert inputs[row].tolist() == expected_input
        assert targets[row].tolist() == expected_target
    shifted = targets != datasets.IGNORE_INDEX  # targets are the inputs moved left by one
    assert torch.equal(targets[:, :-1][shifted[:, :-1]], inputs[:, 1:][shifted[:, :-1]])


def test_clean_caption_and_loading(world):
    assert caption_files.clean_caption("  A Dog  runs.. ") == "a dog runs"
    caps = caption_files.load_captions(str(world / "train.json"), str(world / "images"))
    assert caps.names == sorted(CAPTIONS)
    assert all(c == [CAPTIONS[n]] * 4 for n, c in zip(caps.names, caps.captions))
    raw = caption_files.load_captions(str(world / "val.json"), str(world / "images"), clean=False)
    assert raw.captions[0] == [CAPTIONS[raw.names[0]].capitalize() + "."]


def test_bad_annotations_name_the_file(world, tmp_path):
    bad = _coco(list(CAPTIONS))
    bad["images"][0]["file_name"] = "missing.png"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="missing.png"):
        caption_files.load_captions(str(tmp_path / "bad.json"), str(world / "images"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="broken.json"):
        caption_files.load_captions(str(tmp_path / "broken.json"), str(world / "images"))


# ----------------------------------------------------------------------------------------------- budget

def test_refuses_above_35m_trainable(world, tmp_path, capsys):
    # prefix MLP: 140000 * (64 + 2 * 2 * 64) weights, about 45M trainable parameters
    args = cli(world, tmp_path / "run", "--peft", "prefix", "--prefix-hidden", "140000")
    with pytest.raises(UserError, match="over the course's limit") as err:
        trainer.main(args)
    assert "prefix" in str(err.value) and "cross_attn" in str(err.value)
    assert "parameters:" in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_budget_counts_what_the_checkpoint_holds(world):
    from hw3.models.captioner import build_captioner

    args = parse_args(cli(world, "unused", "--peft", "adapter", "--adapter-dim", "8"))
    captioner = build_captioner(args.encoder, registry.config_from_args(args))
    summary = optimiser.check_budget(captioner.decoder)
    assert summary["trainable"] == sum(v.numel() for v in captioner.decoder.trainable_state_dict().values())
    assert summary["adapter"] > 0 and summary["cross_attn"] > 0


# ----------------------------------------------------------------------------------------------- training

def test_tiny_model_overfits_and_reproduces_captions(world, tmp_path):
    from hw3.models.captioner import load_captioner
    from hw3.models.search import generate
    from hw3.data.tokenizer import BPETokenizer

    out = tmp_path / "run"
    assert trainer.main(cli(world, out, "--peft", "lora", "--lora-rank", "8", "--no-cross-attn-gate", "--epochs", "20",
                             "--lr", "1e-2", "--min-lr", "1e-3", "--label-smoothing", "0", "--select", "val_loss", "--batch-size", "4")) == 0
    steps = [r["loss"] for r in log_records(out) if r["kind"] == "step"]
    assert steps[-1] < steps[0] / 20, (steps[0], steps[-1])
    captioner, meta = load_captioner(str(out / "best.pt"), str(world / "decoder_model.bin"))
    caps = caption_files.load_captions(str(world / "val.json"), str(world / "images"))
    images = torch.stack([captioner.encoder.transform(Image.open(caps.path(i)).convert("RGB"))
                          for i in range(len(caps.names))])
    ids = generate(captioner.decoder, captioner.image_tokens(images), DecodingSettings(method="greedy", max_len=12))
    assert [BPETokenizer().decode(s).strip() for s in ids] == [c[0] for c in caps.captions]
    assert meta["metrics"]["cider"] > 5  # identical captions: CIDEr-D near its 10x maximum
    # validation's decoding is recorded as such and never becomes the checkpoint's inference recommendation
    assert meta["validation_decoding"]["method"] == "greedy" and "inference" not in meta and "generation" not in meta


def test_resume_gives_identical_state(world, tmp_path):
    common = ("--peft", "lora", "--lora-rank", "4", "--lora-dropout", "0.2", "--epochs", "2", "--lr", "1e-3")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer.main(cli(world, straight, *common)) == 0
    assert trainer.main(cli(world, split, *common, "--stop-after", "1")) == 0
    first = load_state(str(split / "last_state.pt"))
    assert first["epoch"] == 1
    torch.manual_seed(12345)  # a resumed run must not depend on the RNG it starts with
    assert trainer.main(cli(world, split, *common, "--resume")) == 0
    a, b = (load_state(str(d / "last_state.pt")) for d in (straight, split))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert set(a["trainable"]) == set(b["trainable"])
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    assert not torch.equal(a["trainable"][name], first["trainable"][name])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    drop = ("seconds", "train_seconds", "time", "setup_seconds")  # when and how fast, not what
    strip = [{k: v for k, v in r.items() if k not in drop} for r in log_records(straight)]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in log_records(split)]


def test_resume_refuses_changed_model(world, tmp_path):
    out = tmp_path / "run"
    assert trainer.main(cli(world, out, "--peft", "none", "--epochs", "2", "--stop-after", "1")) == 0
    with pytest.raises(UserError, match="settings changed"):
        trainer.main(cli(world, out, "--peft", "adapter", "--epochs", "2", "--resume"))
    with pytest.raises(UserError, match="pass --resume"):  # a forgotten --resume must not overwrite the run
        trainer.main(cli(world, out, "--peft", "none", "--epochs", "2"))


def test_validation_subset_with_clipscore(world, tmp_path):
    from hw3.evaluation import metrics
    from hw3.evaluation.metrics import load_references

    clip_config = tmp_path / "tiny-clip.json"
    clip_config.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    args = cli(world, tmp_path / "run", "--peft", "none", "--epochs", "1", "--val-max-images", "2")
    args = [a for a in args if a != "--no-clipscore"]
    assert trainer.main(args + ["--clip-model", str(clip_config), "--clip-pretrained", "none"]) == 0
    record = [r for r in log_records(tmp_path / "run") if r["kind"] == "epoch"][0]
    predictions = json.loads((tmp_path / "run" / "val_predictions.json").read_text())
    assert sorted(predictions) == ["blue", "green"]  # the first two images by file name
    references = load_references(str(world / "val.json"))[0]
    assert record["cider"] == pytest.approx(metrics.cider(predictions, {k: references[k] for k in predictions})[0])
    assert 0 <= record["clipscore"] <= 2.5


# ----------------------------------------------------------------------------------------------- feature cache

def test_feature_cache_holds_encoder_outputs_and_is_reused(world, tmp_path, monkeypatch):
    from hw3.models.encoder import ImageEncoder

    encoder = ImageEncoder(TINY_ENCODER)
    caps = caption_files.load_captions(str(world / "val.json"), str(world / "images"))
    path = feature_cache.build_feature_cache(str(tmp_path), "val", encoder, caps,
                                             feature_cache.Encoding(batch_size=3))
    rows = np.load(path, mmap_mode="r")
    with torch.no_grad():
        reference = encoder(torch.stack([encoder.transform(Image.open(caps.path(i)).convert("RGB"))
                                         for i in range(len(caps.names))]))
    assert rows.dtype == np.float16 and rows.shape == tuple(reference.shape)
    assert np.allclose(rows.astype(np.float32), reference.numpy(), rtol=1e-3, atol=1e-3)
    real_forward = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda *a: pytest.fail("the cache was not reused"))
    assert feature_cache.build_feature_cache(str(tmp_path), "val", encoder, caps) == path
    monkeypatch.setattr(ImageEncoder, "forward", real_forward)
    assert feature_cache.build_feature_cache(str(tmp_path), "val", encoder, caps.subset(2)) != path  # other image list
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)  # other (random) weights under the same spec
    assert feature_cache.build_feature_cache(str(tmp_path), "val", encoder, caps) != path


def test_feature_cache_on_a_full_disk_or_a_small_gpu(world, tmp_path, monkeypatch, capsys):
    """A disk too small for the cache is one line (the folder, the free space) and leaves no file; an
    out-of-memory error while encoding halves the batch and gives the same rows."""
    import errno

    from hw3.models.encoder import ImageEncoder

    encoder = ImageEncoder(TINY_ENCODER)
    caps = caption_files.load_captions(str(world / "val.json"), str(world / "images"))
    reference = np.array(np.load(feature_cache.build_feature_cache(str(tmp_path / "plain"), "val", encoder, caps,
                                                                    feature_cache.Encoding(batch_size=4))))

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "posix_fallocate", no_space, raising=False)
        with pytest.raises(UserError, match=r"the disk is full: writing val-.*partial.npy \(the feature cache\) in "
                                            r".*full.* GB free there"):
            feature_cache.build_feature_cache(str(tmp_path / "full"), "val", encoder, caps)
    assert not [n for n in os.listdir(str(tmp_path / "full")) if n.endswith(".npy")]
    real, calls = ImageEncoder.forward, []

    def forward(self, pixels):
        calls.append(len(pixels))
        if len(pixels) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, pixels)

    monkeypatch.setattr(ImageEncoder, "forward", forward)
    capsys.readouterr()
    halved = np.load(feature_cache.build_feature_cache(str(tmp_path / "small"), "val", encoder, caps,
                                                       feature_cache.Encoding(batch_size=4)))
    assert "out of GPU memory in the feature cache's encoding at batch 4: going on with batch 2" in \
        capsys.readouterr().err
    assert np.allclose(halved.astype(np.float32), reference.astype(np.float32), atol=1e-3)


def test_feature_cache_re_encodes_images_whose_content_changed(world, tmp_path, capsys):
    """The cache is keyed by what the images contain: an image replaced under the same name is encoded again (and
    only it), and stderr says so."""
    import shutil

    from hw3.models.encoder import ImageEncoder

    folder = tmp_path / "images"
    shutil.copytree(str(world / "images"), str(folder))
    encoder = ImageEncoder(TINY_ENCODER)
    caps = caption_files.load_captions(str(world / "val.json"), str(folder))
    path = feature_cache.build_feature_cache(str(tmp_path / "cache"), "val", encoder, caps)
    before = np.array(np.load(path))
    Image.new("RGB", (32, 32), (250, 250, 0)).save(caps.path(1))  # new content, same name
    capsys.readouterr()
    assert feature_cache.build_feature_cache(str(tmp_path / "cache"), "val", encoder, caps) == path
    assert "re-encoded 1 of %d images whose content changed" % len(caps.names) in capsys.readouterr().err
    after = np.load(path)
    with torch.no_grad():
        fresh = encoder(encoder.transform(Image.open(caps.path(1)).convert("RGB")).unsqueeze(0))[0].numpy()
    assert np.allclose(after[1].astype(np.float32), fresh, rtol=1e-3, atol=1e-3)
    assert not np.allclose(after[1], before[1]) and np.array_equal(np.delete(after, 1, 0), np.delete(before, 1, 0))


def test_training_from_the_cache_matches_images(world, tmp_path):
    """One step from cached fp16 features gives (nearly) the loss of the same step from images."""
    common = ("--peft", "adapter", "--adapter-dim", "8", "--epochs", "1", "--label-smoothing", "0")
    assert trainer.main(cli(world, tmp_path / "images", *common)) == 0
    assert trainer.main(cli(world, tmp_path / "cached", *common, "--feature-cache", str(tmp_path / "cache"))) == 0
    a, b = ([r["loss"] for r in log_records(tmp_path / d) if r["kind"] == "step"] for d in ("images", "cached"))
    assert len(a) == len(b) == 2 and np.allclose(a, b, rtol=1e-2)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_augment_and_cache_are_exclusive(world, tmp_path):
    with pytest.raises(UserError, match="--augment"):
        parse_args(cli(world, tmp_path, "--augment", "--feature-cache", str(tmp_path)))


def test_augmented_training_runs_and_crops_mildly(world, tmp_path):
    image = _image("grid.png").resize((64, 48))
    torch.manual_seed(0)
    crops = [datasets.light_augmentation()(image) for _ in range(20)]
    assert all(c.size[0] * c.size[1] >= 0.8 * 64 * 48 - 64 for c in crops)
    assert len({c.tobytes() for c in crops}) > 1
    assert trainer.main(cli(world, tmp_path / "run", "--peft", "none", "--epochs", "1", "--augment")) == 0


# ----------------------------------------------------------------------------------------------- DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(world, tmp_path):
    from hw3.models.captioner import load_captioner

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), os.path.join(ROOT, "p2_train.py")]
    command += cli(world, out, "--peft", "prefix", "--prefix-len", "2", "--prefix-hidden", "0", "--epochs", "2",
                   "--feature-cache", str(tmp_path / "cache"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run(command, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    records = log_records(out)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]  # one writer: rank 0
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 2 * 1  # 16 pairs / (2 processes x 8) = 1 step per epoch
    captioner, meta = load_captioner(str(out / "best.pt"), str(world / "decoder_model.bin"))
    state = load_state(str(out / "last_state.pt"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    cache = np.load(str(next((tmp_path / "cache").glob("train-*.npy"))))
    assert np.isfinite(cache).all() and (np.abs(cache).sum(axis=(1, 2)) > 0).all()  # both ranks filled their rows


# ----------------------------------------------------------------------------------------------- other formats

def other_format_cli(world, out, captions, images, *extra):
    """cli() with one caption file as both --train-json and --val-json, and one image folder."""
    args = cli(world, out, *extra)
    for option, value in (("--train-json", captions), ("--val-json", captions), ("--train-images", images),
                          ("--val-images", images)):
        args[args.index(option) + 1] = str(value)
    return args


@pytest.fixture(scope="module")
def fashion_world(world, tmp_path_factory):
    """The world's images under DeepFashion-style names, with a paragraph each, in both the DeepFashion
    captions.json format and a Karpathy split file of the same images."""
    import shutil

    root = tmp_path_factory.mktemp("fashion")
    (root / "images").mkdir()
    paragraphs, splits = {}, {}
    for i in range(12):
        source = sorted(CAPTIONS)[i % 4]
        name = "WOMEN-Dresses-id_%08d-01_%d_front.png" % (i, i % 7)
        shutil.copy(str(world / "images" / source), str(root / "images" / name))
        paragraphs[name] = "%s. The picture is plain." % CAPTIONS[source].capitalize()
        splits[name] = ("train", "restval", "val", "test")[i % 4]
    (root / "captions.json").write_text(json.dumps(paragraphs))
    karpathy = {"images": [{"filename": n, "split": splits[n], "sentences": [{"raw": c}]}
                           for n, c in paragraphs.items()]}
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    return root


@pytest.mark.parametrize("captions", ["captions.json", "karpathy.json"])
def test_one_epoch_from_other_formats_validates_the_suite(world, fashion_world, tmp_path, captions, capsys):
    """One epoch from a DeepFashion-style captions.json (divided by file-name hash) and from a Karpathy file (its
    train + restval, validated on val), with the metric suite at validation and best.pt chosen by its mean."""
    meteor = metrics_module().meteor_unavailable() is None
    suite = "bleu,meteor,rouge,cider" if meteor else "bleu,rouge,cider"
    out = tmp_path / "run"
    args = other_format_cli(world, out, fashion_world / captions, fashion_world / "images", "--peft", "none",
                            "--epochs", "1", "--val-metrics", suite, "--select-on", "mean" if meteor else "bleu-4",
                            "--val-fraction", "0.4")
    assert trainer.main(args) == 0
    err = capsys.readouterr().err
    record = [r for r in log_records(out) if r["kind"] == "epoch"][0]
    assert {"bleu-1", "bleu-4", "rouge-l", "cider"} <= set(record) and "clipscore" not in record
    assert ("meteor" in record and "mean" in record) == meteor
    predictions = json.loads((out / "val_predictions.json").read_text())
    names = json.loads((fashion_world / captions).read_text())
    if captions == "karpathy.json":
        assert "train split, 6 of 12 images (train 6, val 3, test 3)" in err
        expected_val = sorted(os.path.splitext(i["filename"])[0] for i in names["images"] if i["split"] == "val")
    else:
        val = [n for n in names if caption_files.in_val_fraction(n, 0.4)]
        assert "%d train, %d val" % (12 - len(val), len(val)) in err
        expected_val = sorted(os.path.splitext(n)[0] for n in val)
    assert sorted(predictions) == expected_val
    assert json.loads((out / "best.json").read_text())["metrics"]["bleu-4"] == record["bleu-4"]


def metrics_module():
    from hw3.evaluation import metrics

    return metrics


def test_cut_captions_are_counted(world, tmp_path, capsys):
    from hw3.data.tokenizer import BPETokenizer

    assert trainer.main(cli(world, tmp_path / "run", "--peft", "none", "--epochs", "1",
                             "--max-caption-tokens", "3")) == 0
    err = capsys.readouterr().err
    tokenizer = BPETokenizer()
    longer = [c for c in CAPTIONS.values() if len(tokenizer.encode(c)) > 3]  # train.json has each caption 4 times
    longest = max(len(tokenizer.encode(c)) for c in CAPTIONS.values())
    assert 0 < len(longer) < 4
    assert ("captions cut to --max-caption-tokens 3: %d of 16 training (longest %d tokens), %d of 4 validation "
            "(longest %d)" % (4 * len(longer), longest, len(longer), longest)) in err
    assert "from the training captions" not in err  # the option given wins, and is recorded
    assert json.loads((tmp_path / "run" / "best.json").read_text())["max_caption_tokens"] == 3


# A paragraph of 7 clauses (about 50 GPT-2 tokens), beyond the tiny GPT-2's 32 positions and the decoding default 30.
PARAGRAPH = ", ".join(["a red square on a table"] * 7)


def _length_world(world, tmp_path):
    """train.json with one paragraph among the short captions: (its path, the paragraph's token count)."""
    from hw3.data.tokenizer import BPETokenizer

    coco = _coco(list(CAPTIONS), copies=4)
    coco["annotations"][0]["caption"] = PARAGRAPH
    path = tmp_path / "long.json"
    path.write_text(json.dumps(coco))
    return path, len(BPETokenizer().encode(caption_files.clean_caption(PARAGRAPH)))


def _with_train_json(argv, path):
    at = argv.index("--train-json")
    return argv[:at + 1] + [str(path)] + argv[at + 2:]


def test_default_caption_length_follows_the_data(world, tmp_path, capsys):
    """Without --max-caption-tokens the longest training caption, rounded up to a multiple of 8, sets it: recorded in
    the checkpoint JSON, which then decodes at a length that covers it; the GPT-2's positions cap it."""
    from hw3.models import decoding

    long_json, longest = _length_world(world, tmp_path)
    expected = -(-longest // CAPTION_LENGTH_STEP) * CAPTION_LENGTH_STEP
    assert longest > 30 and expected % 8 == 0 and expected >= longest
    out = tmp_path / "gru"
    assert trainer.main(_with_train_json(scratch_cli(world, out, "gru", "--epochs", "1"), long_json)) == 0
    err = capsys.readouterr().err
    assert ("caption length: --max-caption-tokens %d from the training captions (the longest has %d tokens"
            % (expected, longest)) in err and "captions cut" not in err
    meta = json.loads((out / "best.json").read_text())
    assert meta["max_caption_tokens"] == expected and meta["decoder"]["block_size"] == expected + 2
    assert decoding.resolve_decoding({}, meta)[0].max_len == expected + 1
    gpt2 = tmp_path / "gpt2"
    assert trainer.main(_with_train_json(cli(world, gpt2, "--peft", "none", "--epochs", "1"), long_json)) == 0
    assert "captions cut to 30 tokens (the decoder's 32 positions less start and end): 1 of 16 training" in \
        capsys.readouterr().err
    assert json.loads((gpt2 / "best.json").read_text())["max_caption_tokens"] == 30  # what training used
    short = tmp_path / "short"
    assert trainer.main(cli(world, short, "--peft", "none", "--epochs", "1")) == 0
    assert json.loads((short / "best.json").read_text())["max_caption_tokens"] == CAPTION_LENGTH_STEP


def test_warm_up_stays_a_small_share_of_the_run(world, tmp_path, capsys):
    """Warm-up never takes more than WARMUP_SHARE of the steps, whatever --warmup-steps says (the compare stage's 500
    on about 200 images, 16 steps an epoch), so the run reaches --lr; the steps used are printed and recorded."""
    from hw3.pipeline.stages import compare as compare_stage

    compare = compare_stage.COMPARE_TRAINING
    steps = compare["epochs"] * -(-200 * 5 // compare["batch_size"])  # 200 images, 5 captions each
    warmup = optimiser.effective_warmup(compare["warmup_steps"], steps)
    assert 0 < warmup <= optimiser.WARMUP_SHARE * steps and warmup < compare["warmup_steps"]
    schedule = optimiser.WarmupCosine(warmup, steps, 0.1)
    assert schedule(warmup) == max(schedule(s) for s in range(steps)) == 1.0  # the peak, right after warm-up
    for total in (1, 9, 10, 240, 10 ** 6):
        assert optimiser.effective_warmup(500, total) <= optimiser.WARMUP_SHARE * total
    assert optimiser.effective_warmup(500, 10 ** 6) == 500  # a long run takes what was asked
    out = tmp_path / "run"
    assert trainer.main(cli(world, out, "--peft", "none", "--epochs", "10", "--warmup-steps", "50")) == 0
    assert "warm-up: 2 of 20 optimiser steps (--warmup-steps 50, at most 10% of the run)" in capsys.readouterr().err
    meta = json.loads((out / "best.json").read_text())
    assert meta["warmup_steps"] == log_records(out)[0]["warmup_steps"] == 2 and meta["total_steps"] == 20


@pytest.mark.parametrize("extra, expected", [
    (("--select-on", "bleu-4"), "--select-on bleu-4 needs bleu-4 at validation: add bleu to --val-metrics"),
    (("--select-on", "mean", "--val-metrics", "bleu,cider"), "needs meteor, rouge-l at validation"),
    (("--val-metrics", "cider,refclipscore"), "--val-metrics refclipscore needs CLIP: drop --no-clipscore"),
    (("--val-metrics", "cider,spice"), "--val-metrics 'cider,spice': choose from"),
])
def test_validation_metric_options_are_checked_first(world, tmp_path, extra, expected):
    with pytest.raises(UserError) as err:
        parse_args(cli(world, tmp_path, *extra))
    assert expected in str(err.value)


def test_runs_from_before_the_split_options_still_resume(world, tmp_path):
    """Split options at their defaults are left out of the resume settings, as they were before they existed;
    changed, --resume refuses them."""
    out = tmp_path / "run"
    common = ("--peft", "none", "--epochs", "2")
    assert trainer.main(cli(world, out, *common, "--stop-after", "1")) == 0
    state = load_state(str(out / "last_state.pt"))
    assert not set(LATER_TRAJECTORY_OPTIONS) & set(state["settings"])
    with pytest.raises(UserError, match="--val-fraction"):
        trainer.main(cli(world, out, *common, "--resume", "--val-fraction", "0.3"))
    assert trainer.main(cli(world, out, *common, "--resume")) == 0


# ----------------------------------------------------------------------------------------------- architectures

SCRATCH = {"gru": ("--embed-dim", "32", "--hidden-dim", "32"),
           "attention-gru": ("--embed-dim", "32", "--hidden-dim", "32", "--attention-dim", "16"),
           "transformer": ("--n-layer", "2", "--n-head", "2", "--n-embd", "32")}


def scratch_cli(world, out, arch, *extra):
    argv = cli(world, out, "--arch", arch, *SCRATCH[arch], *extra)
    at = argv.index("--decoder-weights")
    return argv[:at] + argv[at + 2:]  # trained from scratch: no GPT-2


@pytest.mark.parametrize("arch", sorted(SCRATCH))
def test_from_scratch_archs_learn_the_captions(world, tmp_path, arch):
    from hw3.models.captioner import load_captioner

    out = tmp_path / arch
    assert trainer.main(scratch_cli(world, out, arch, "--epochs", "30", "--lr", "1e-2", "--label-smoothing", "0",
                                     "--batch-size", "4", "--dropout", "0", "--select", "val_loss")) == 0
    meta = json.loads((out / "best.json").read_text())
    assert meta["arch"] == arch and meta["metrics"]["cider"] > 5  # every validation caption right
    ids = meta["decoder"]["output_ids"]
    assert 50256 in ids and len(ids) < 40  # the compact output layer: the training captions' ids only
    start = log_records(out)[0]
    assert start["parameters"]["trainable"] == meta["trainable_parameters"] and start["parameters"]["frozen"] == 0
    captioner, _ = load_captioner(str(out / "best.pt"), "")
    assert captioner.arch == arch


@pytest.mark.parametrize("arch", sorted(SCRATCH))
def test_from_scratch_resume_gives_identical_state(world, tmp_path, arch):
    common = ("--epochs", "2", "--lr", "1e-3", "--dropout", "0.3")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer.main(scratch_cli(world, straight, arch, *common)) == 0
    assert trainer.main(scratch_cli(world, split, arch, *common, "--stop-after", "1")) == 0
    torch.manual_seed(12345)
    assert trainer.main(scratch_cli(world, split, arch, *common, "--resume")) == 0
    a, b = (load_state(str(d / "last_state.pt")) for d in (straight, split))
    assert a["settings"]["arch"] == arch and a["epoch"] == b["epoch"] == 2
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    with pytest.raises(UserError, match="settings changed"):  # another architecture never continues this run
        trainer.main(scratch_cli(world, split, "gru" if arch != "gru" else "attention-gru", *common, "--resume"))


# ----------------------------------------------------------------------------------------------- self-critical

def test_sample_pairs_end_only_where_the_caption_ended():
    inputs, targets = sample_pairs([[5, 6], [7, 8, 9]], max_len=3)
    assert inputs.tolist() == [[50256, 5, 6], [50256, 7, 8]]  # no input after the last target: 3 positions, not 5
    assert targets.tolist() == [[5, 6, 50256], [7, 8, 9]]  # the second was cut at max_len: no end token target
    inputs, targets = sample_pairs([[5, 6], [7]], max_len=3)
    assert inputs.tolist() == [[50256, 5, 6], [50256, 7, 50256]] and targets.tolist() == [[5, 6, 50256],
                                                                                         [7, 50256, -100]]
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    assert baseline_of(rewards).tolist() == [[2.5, 2.0, 1.5]]


def test_scst_moves_probability_towards_rewarded_captions():
    """The policy gradient's direction: rewarded by whether the caption says "red", a few self-critical epochs raise
    the probability that the first word is "red" from chance to most of the mass."""

    from torch.utils.data import DataLoader

    from hw3.models.captioner import build_captioner
    from hw3.data.images import collate_images
    from tiny_models import CAPTION_ENCODER
    from hw3.models.transformer_decoder import TransformerConfig

    torch.manual_seed(0)
    red, words = 2266, (257, 4171, 6616, 2266, 50256)  # " red" among " a", " blue", " square" and the end token
    captioner = build_captioner(CAPTION_ENCODER, TransformerConfig(output_ids=tuple(sorted(words)), n_layer=1,
                                                                   n_head=2, n_embd=16, dropout=0.0, block_size=8))
    decoder = captioner.decoder
    feats = torch.randn(8, 3, decoder.cfg.encoder_dim)  # image tokens, as a feature cache gives them
    loader = DataLoader([(i, feats[i], "") for i in range(8)], batch_size=4, collate_fn=collate_images)
    config = TrainingConfig.from_options(dict(scst_samples=6, scst_temperature=1.0, val_max_len=3, seed=0,
                                              scst_baseline="mean", grad_clip=1.0, epochs=0, scst_epochs=8,
                                              log_every=1000, lr=1e-2, scst_lr=1e-2, min_lr=1e-3, warmup_steps=0,
                                              weight_decay=0.0))
    optimizer, scheduler = optimiser.make_optimizer(decoder, config, total_steps=0)
    state = TrainingState(config, captioner, captioner, optimizer, scheduler, optimiser.grad_scaler(False),
                          Dist("cpu"), "/dev/null")

    def p_red():
        with torch.no_grad():
            logits = decoder(torch.full((8, 1), 50256), image_tokens=feats)[:, -1]
            return float(logits.softmax(-1)[:, decoder.vocab.targets(torch.tensor([red]))].mean())

    before = p_red()
    for epoch in range(config.scst.scst_epochs):
        figures = scst_epoch(state, epoch, loader, [str(i) for i in range(8)],
                                  lambda rows, captions, ended: [float("red" in c) for c in captions])
    assert before < 0.4 and p_red() > 0.8, (before, p_red())
    assert figures["mean_reward"] > 0.5 and 0 <= figures["reward_share"] < 1


def test_scst_resumes_identically_and_records_its_settings(world, tmp_path):
    """A short cross-entropy start, then self-critical epochs; a run cut in the middle of its self-critical epochs
    resumes to the identical state; the log and best.pt record the phase and the SCST settings."""
    arch = "attention-gru"
    common = ("--epochs", "2", "--lr", "1e-2", "--scst-epochs", "2", "--scst-lr", "1e-3", "--scst-samples", "3",
              "--dropout", "0.2", "--label-smoothing", "0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer.main(scratch_cli(world, straight, arch, *common)) == 0
    scst = [r for r in log_records(straight) if r["kind"] == "epoch" and r.get("phase") == "scst"]
    assert len(scst) == 2 and all(0 < r["reward_share"] < 1 and r["mean_reward"] >= 0 for r in scst)
    meta = json.loads((straight / "best.json").read_text())
    assert meta["scst"]["scst_samples"] == 3 and meta["scst"]["scst_baseline"] == "mean"
    assert trainer.main(scratch_cli(world, split, arch, *common, "--stop-after", "3")) == 0
    assert trainer.main(scratch_cli(world, split, arch, *common, "--resume")) == 0
    a, b = (load_state(str(d / "last_state.pt")) for d in (straight, split))
    assert a["epoch"] == b["epoch"] == 4 and a["settings"]["scst_epochs"] == 2
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name


def test_scst_from_a_checkpoint_validates_it_first(world, tmp_path):
    first = tmp_path / "ce"
    assert trainer.main(scratch_cli(world, first, "gru", "--epochs", "3", "--lr", "1e-2")) == 0
    out = tmp_path / "scst"
    assert trainer.main(scratch_cli(world, out, "gru", "--epochs", "0", "--scst-epochs", "1", "--init-from",
                                     str(first / "best.pt"), "--scst-baseline", "greedy", "--scst-samples", "1")) == 0
    epochs = [r for r in log_records(out) if r["kind"] == "epoch"]
    start = json.loads((first / "best.json").read_text())["metrics"]["cider"]
    assert epochs[0]["epoch"] == 0 and epochs[0]["phase"] == "init" and epochs[0]["cider"] == pytest.approx(start)
    assert json.loads((out / "best.json").read_text())["metrics"]["cider"] >= start  # never worse than the start
    with pytest.raises(UserError, match="another config"):
        trainer.main(scratch_cli(world, tmp_path / "other", "gru", "--hidden-dim", "16", "--epochs", "0",
                                  "--scst-epochs", "1", "--init-from", str(first / "best.pt")))
    with pytest.raises(UserError, match="give --init-from"):
        trainer.main(scratch_cli(world, tmp_path / "none", "gru", "--epochs", "0", "--scst-epochs", "1"))


COMMITTED_MODELS = os.path.join(ROOT, "miniworld", "models")


@pytest.mark.parametrize("name", sorted(n[:-5] for n in os.listdir(COMMITTED_MODELS)
                                        if n.startswith(("p2_", "distill_")) and n.endswith(".json")))
def test_model_options_rebuild_each_committed_checkpoints_config(name):
    """registry.model_options(checkpoint JSON) through to_argv, parse_args and config_from_args gives the
    checkpoint's decoder config again, for every committed world captioner (PEFT, self-critical, from scratch):
    what --init-from needs."""
    meta = json.load(open(os.path.join(COMMITTED_MODELS, name + ".json"), encoding="utf-8"))
    flags = to_argv(TrainingConfig.from_options(registry.model_options(meta)))
    weights = ["--decoder-weights", os.path.join(COMMITTED_MODELS, "decoder_model.bin")] if "--peft" in flags else []
    args = parse_args(["--train-json", "t.json", "--train-images", "t", "--val-json", "v.json",
                                "--val-images", "v", "--out", "o"] + weights + flags)
    cfg = registry.config_from_args(args, meta["decoder"].get("output_ids")).to_dict()
    want = dict(meta["decoder"])
    built = ("checkpoint", "encoder_dim") + (("n_layer", "n_head", "n_embd", "vocab_size", "block_size") if weights
                                             else ())  # set when the model is built: the encoder's, GPT-2's sizes
    for key in built:
        cfg.pop(key, None), want.pop(key, None)
    assert json.loads(json.dumps(cfg)) == want


def test_model_options_refuse_a_config_without_a_peft_method():
    with pytest.raises(UserError, match="no PEFT method"):
        registry.model_options(dict(decoder=dict(lora_rank=0, adapter_dim=0, prefix_len=0, prompt_len=0)))


# ----------------------------------------------------------------------------------------------- out of memory

class LaterOutOfMemory(RuntimeError):
    """torch.cuda.OutOfMemoryError where torch 1.12 has none."""


@pytest.mark.parametrize("spelling", ["torch-1.12", "OutOfMemoryError"])
def test_out_of_memory_halves_the_batch_and_keeps_the_planned_step(world, tmp_path, monkeypatch, spelling):
    """A CUDA out-of-memory error at some step (injected on the CPU, in either spelling) cuts the batch in
    pieces whose gradients add up to the planned batch's: the weights match the run without it, within float
    rounding; stderr says so and the log records it."""
    from hw3.models import captioner
    from hw3.util import resources

    args = ["--peft", "lora", "--lora-dropout", "0", "--epochs", "2", "--grad-accum", "2", "--batch-size", "4",
            "--lr", "3e-3"]
    assert trainer.main(cli(world, tmp_path / "planned", *args)) == 0
    if spelling == "OutOfMemoryError":
        monkeypatch.setattr(torch.cuda, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError",
                                                                    LaterOutOfMemory), raising=False)
        error = torch.cuda.OutOfMemoryError("CUDA error: allocation failed")  # the class, not the message, counts
    else:
        error = RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 10.76 GiB total capacity)")
    assert resources.is_out_of_memory(error) and not resources.is_out_of_memory(RuntimeError("shape mismatch"))
    real, calls = captioner.Captioner.forward, []

    def forward(self, visuals, *rest, **kwargs):
        calls.append(len(visuals))
        if self.training and len(calls) == 4 and len(visuals) > 2:  # the second step's second micro-batch
            raise error
        return real(self, visuals, *rest, **kwargs)

    monkeypatch.setattr(captioner.Captioner, "forward", forward)
    assert trainer.main(cli(world, tmp_path / "halved", *args)) == 0
    planned, halved = (load_state(str(tmp_path / name / "last_state.pt"))["trainable"]
                       for name in ("planned", "halved"))
    assert planned.keys() == halved.keys()
    for name in planned:
        assert torch.allclose(planned[name], halved[name], rtol=0, atol=1e-5), name  # Adam's steps are 3e-3
    events = [r for r in log_records(tmp_path / "halved") if r["kind"] == "out_of_memory"]
    assert events == [dict(kind="out_of_memory", where="training", step=2, pieces=2, batch_size=2)]
    assert len([r for r in log_records(tmp_path / "halved") if r["kind"] == "step"]) == len(
        [r for r in log_records(tmp_path / "planned") if r["kind"] == "step"])
