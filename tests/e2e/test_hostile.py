"""Hostile-input probes as one table: each row gives a script hostile or broken input and states the exit code, a
fragment of the one-line message, and that an earlier output survives (and, for crafted weight files, that the
file's payload never ran). Every row runs in both test lanes (torch 1.12 takes the restricted-unpickler path).

A row is (id, script, arguments, expected exit code, message fragment); `{x}` in an argument is a path of the row's
laboratory: the shared files below, or files the row's setup made in its own folder ({tmp}).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
import struct
import subprocess
import zlib
from collections import namedtuple

import pytest
import torch
from PIL import Image

from hw3.models import captioner
from hw3.models import decoding
from hw3.util.errors import run_main
from hw3.models.gpt2 import Config
from tiny_models import TINY_ENCODER, tiny_gpt2

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
EARLIER = "earlier output\n"
Probe = namedtuple("Probe", "id script args code fragment setup survives check")


class Payload:
    """Unpickling this runs os.mkdir(marker): the stand-in for a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def png_claiming(path: str, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (PIL refuses it as a decompression bomb on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                + chunk(b"IEND", b""))


def coco(names) -> dict:
    return dict(images=[dict(id=i + 1, file_name=n) for i, n in enumerate(names)],
                annotations=[dict(id=10 * i + c, image_id=i + 1, caption="a %s picture number %d" % (n[:-4], c))
                             for i, n in enumerate(names) for c in range(2)])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """What the probes share: images, COCO files, a tiny GPT-2, a tiny captioner checkpoint, a tiny CLIP."""
    root = tmp_path_factory.mktemp("lab")
    images = root / "images"
    images.mkdir()
    for k, colour in enumerate(["red", "navy", "olive", "teal"]):
        Image.new("RGB", (32 + 4 * k, 32), colour).save(str(images / ("im%d.png" % k)))
    (root / "train.json").write_text(json.dumps(coco(sorted(os.listdir(str(images))))))
    weights = tiny_gpt2(root / "decoder_model.bin", n_layer=2, n_embd=64, n_head=2, n_positions=32)
    model = captioner.build_captioner(TINY_ENCODER, Config(checkpoint=weights))
    checkpoint = str(root / "p2.pt")
    captioner.save_checkpoint(checkpoint, model)
    config = str(root / "tiny_clip.json")
    with open(config, "w") as f:
        json.dump(TINY_CLIP, f)
    (root / "id2label.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    return dict(root=str(root), images=str(images), decoder=weights, checkpoint=checkpoint, clip=config,
                id2label=str(root / "id2label.json"), train=str(root / "train.json"))


# ----------------------------------------------------------------------------------------------- row setups

def crafted(name: str, legacy: bool = False):
    """A weight file whose unpickling would run code, shaped like a state dict."""
    def setup(lab, tmp):
        torch.save({"wte.weight": Payload(os.path.join(tmp, "MARKER")), "x": torch.zeros(1)},
                   os.path.join(tmp, name), _use_new_zipfile_serialization=not legacy)
    return setup


def crafted_checkpoint(lab, tmp):
    crafted("p2.pt")(lab, tmp)
    shutil.copy(captioner.config_path(lab["checkpoint"]), os.path.join(tmp, "p2.json"))


def with_config(**changes):
    def setup(lab, tmp):
        shutil.copy(lab["checkpoint"], os.path.join(tmp, "p2.pt"))
        meta = json.load(open(captioner.config_path(lab["checkpoint"])))
        meta.update(changes)
        with open(os.path.join(tmp, "p2.json"), "w") as f:
            json.dump(meta, f)
    return setup


def nan_decoder(lab, tmp):
    state = torch.load(lab["decoder"])
    state["h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(state, os.path.join(tmp, "decoder_model.bin"))


def nan_checkpoint(lab, tmp):
    state = torch.load(lab["checkpoint"])
    name = sorted(state)[0]
    state[name] = state[name].clone().fill_(float("inf"))
    torch.save(state, os.path.join(tmp, "p2.pt"))
    shutil.copy(captioner.config_path(lab["checkpoint"]), os.path.join(tmp, "p2.json"))


def bomb_folder(lab, tmp):
    os.makedirs(os.path.join(tmp, "images"))
    for name in sorted(os.listdir(lab["images"]))[:2]:
        shutil.copy(os.path.join(lab["images"], name), os.path.join(tmp, "images", name))
    png_claiming(os.path.join(tmp, "images", "zz_bomb.png"), 20000, 20000)
    with open(os.path.join(tmp, "val.json"), "w") as f:
        json.dump(coco(sorted(os.listdir(os.path.join(tmp, "images")))), f)
    with open(os.path.join(tmp, "pred.json"), "w") as f:
        json.dump({os.path.splitext(n)[0]: "a picture" for n in os.listdir(os.path.join(tmp, "images"))}, f)


def p1_images(lab, tmp):
    os.makedirs(os.path.join(tmp, "p1"))
    for k, name in enumerate(sorted(os.listdir(lab["images"]))):
        shutil.copy(os.path.join(lab["images"], name), os.path.join(tmp, "p1", "%d_%d.png" % (k % 2, k)))


def duplicate_labels(lab, tmp):
    p1_images(lab, tmp)
    with open(os.path.join(tmp, "id2label.json"), "w") as f:
        json.dump({"0": "maple_tree", "1": "Maple tree"}, f)


def trained_run(lab, tmp):
    """One finished epoch of two (--stop-after 1): a run that --resume could continue."""
    assert run_script("p2_train", train_args(lab, tmp, "{images}", "--epochs", "2", "--stop-after", "1"))[0] == 0


def folder_twin(lab, tmp):
    os.makedirs(os.path.join(tmp, "twin"))
    shutil.copy(os.path.join(lab["images"], "im0.png"), os.path.join(tmp, "twin", "im0.png"))


def p3_with_a_broken_third_image(lab, tmp):
    os.makedirs(os.path.join(tmp, "images"))
    for name in sorted(os.listdir(lab["images"]))[:2]:
        shutil.copy(os.path.join(lab["images"], name), os.path.join(tmp, "images", name))
    with open(os.path.join(tmp, "images", "zz_broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")


def earlier_p3_folder(lab, tmp):
    os.makedirs(os.path.join(tmp, "p3"), exist_ok=True)
    for name in ("attention.json", "old.png"):
        with open(os.path.join(tmp, "p3", name), "w") as f:
            f.write(EARLIER)


def fifo(lab, tmp):
    os.mkfifo(os.path.join(tmp, "out.json"))


def device(lab, tmp):
    if os.geteuid() != 0:
        pytest.skip("making a device file needs root")
    os.mknod(os.path.join(tmp, "out.json"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own


def symlink(lab, tmp):
    with open(os.path.join(tmp, "real.json"), "w") as f:
        f.write(EARLIER)
    os.symlink("real.json", os.path.join(tmp, "out.json"))


def read_only_folder(lab, tmp):
    os.makedirs(os.path.join(tmp, "ro"))
    if os.geteuid() == 0:  # root ignores permission bits; an immutable folder refuses even root
        if subprocess.run(["chattr", "+i", os.path.join(tmp, "ro")], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here, and root ignores permission bits")
    else:
        os.chmod(os.path.join(tmp, "ro"), 0o555)


def not_a_folder(lab, tmp):
    with open(os.path.join(tmp, "file.txt"), "w") as f:
        f.write("a file, not a folder\n")


def changed_image_after_caching(lab, tmp):
    shutil.copytree(lab["images"], os.path.join(tmp, "images"))
    assert run_script("p2_train", train_args(lab, tmp, "{tmp}/images", "--feature-cache", "{tmp}/cache",
                                             "--out", "{tmp}/first"))[0] == 0
    Image.new("RGB", (32, 32), "yellow").save(os.path.join(tmp, "images", "im1.png"))


# ----------------------------------------------------------------------------------------------- rows

def infer(*extra, out="{tmp}/out.json", decoder="{decoder}", checkpoint="{checkpoint}", images="{images}"):
    return [images, out, decoder, "--checkpoint", checkpoint, "--device", "cpu", "--num-workers", "0"] + list(extra)


def train_args(lab, tmp, images, *extra):
    # one file as both: the whole of it on both sides (without the splits it would be divided by file-name hash)
    base = ["--train-json", "{train}", "--train-images", images, "--val-json", "{train}", "--val-images", images,
            "--train-split", "all", "--val-split", "all",
            "--decoder-weights", "{decoder}", "--encoder", TINY_ENCODER, "--workers", "0", "--device", "cpu",
            "--no-clipscore", "--batch-size", "4", "--val-max-len", "4", "--warmup-steps", "1", "--out", "{tmp}/run"]
    return fill(base + list(extra), lab, tmp)


def train(*extra, images="{images}"):
    return ["TRAIN", images] + list(extra)


def p1(*extra, images="{tmp}/p1", id2label="{id2label}", out="{tmp}/out.csv"):
    return [images, id2label, out, "--model", "{clip}", "--pretrained", "none", "--workers", "0",
            "--device", "cpu"] + list(extra)


def p3(*extra, images="{images}", out="{tmp}/p3", checkpoint="{checkpoint}"):
    return ["--images", images, "--checkpoint", checkpoint, "--decoder", "{decoder}", "--out", out,
            "--device", "cpu"] + list(extra)


def mode_is_plain(tmp):
    assert stat.S_IMODE(os.stat(os.path.join(tmp, "out.json")).st_mode) == 0o644  # umask 022, as a plain open()
    assert stat.S_IMODE(os.stat(os.path.join(tmp, "kept.json")).st_mode) == 0o640  # an existing file keeps its mode


def still_a_link(tmp):
    assert os.path.islink(os.path.join(tmp, "out.json"))
    assert json.load(open(os.path.join(tmp, "real.json")))  # the captions went through the link


PROBES = [
    # -- no file given to the project runs code (the marker would appear)
    Probe("resume state with code", "p2_train", train("--resume"), 2, "refused", crafted("run/last_state.pt"),
          "run/best.pt", None),
    Probe("decoder weights with code", "p2_inference", infer(decoder="{tmp}/decoder.bin"), 2, "refused",
          crafted("decoder.bin"), "out.json", None),
    Probe("decoder weights with code, legacy format", "p2_inference", infer(decoder="{tmp}/decoder.bin"), 2,
          "refused", crafted("decoder.bin", legacy=True), "out.json", None),
    Probe("checkpoint with code", "p2_inference", infer(checkpoint="{tmp}/p2.pt"), 2, "refused", crafted_checkpoint,
          "out.json", None),
    Probe("encoder weights with code", "p2_inference",
          infer("--encoder", "timm:vit_tiny_patch16_224@{tmp}/vit.pt?depth=1&img_size=32&patch_size=8"), 2,
          "refused", crafted("vit.pt"), "out.json", None),
    Probe("CLIP weights with code", "p1_clip_zeroshot",
          [a.replace("none", "{tmp}/clip.pt") for a in p1()], 2, "refused",
          lambda lab, tmp: (p1_images(lab, tmp), crafted("clip.pt")(lab, tmp)), "out.csv", None),
    # -- silent wrong results become refusals naming the argument
    Probe("adapter width -5", "p2_train", train("--peft", "adapter", "--adapter-dim", "-5"), 2,
          "--adapter-dim must be at least 1", None, None, None),
    Probe("adapter width 0", "p2_train", train("--peft", "adapter", "--adapter-dim", "0"), 2,
          "--adapter-dim must be at least 1", None, None, None),
    Probe("LoRA rank -1", "p2_train", train("--peft", "lora", "--lora-rank", "-1"), 2, "--lora-rank must be at least 1",
          None, None, None),
    Probe("another method's option", "p2_train", train("--peft", "adapter", "--lora-rank", "8"), 2,
          "--lora-rank belongs to --peft lora", None, None, None),
    Probe("--resume with a new --lr", "p2_train", train("--epochs", "2", "--resume", "--lr", "0.005"), 2,
          "--lr 0.0002 -> 0.005", trained_run, "run/best.pt", None),
    Probe("--layer 99", "p3_visualize", p3("--layer", "99"), 2, "--layer 99: the decoder has blocks 0..1",
          earlier_p3_folder, "p3/old.png", None),
    Probe("two images of one name", "p3_visualize", p3(images="{images}", out="{tmp}/p3") + ["--images", "{images}",
          "{tmp}/twin"], 2, "would both be drawn as im0.png", folder_twin, None, None),
    Probe("decoder weights with NaN", "p2_inference", infer(decoder="{tmp}/decoder_model.bin"), 2, "NaN",
          nan_decoder, "out.json", None),
    Probe("checkpoint with inf", "p2_inference", infer(checkpoint="{tmp}/p2.pt"), 2, "NaN or infinite",
          nan_checkpoint, "out.json", None),
    Probe("duplicate class names", "p1_clip_zeroshot", p1(id2label="{tmp}/id2label.json"), 2,
          "share the class name 'Maple tree'", duplicate_labels, "out.csv", None),
    Probe("an image changed after caching", "p2_train",
          train("--feature-cache", "{tmp}/cache", "--out", "{tmp}/second", images="{tmp}/images"), 0,
          "re-encoded 1 of 4 images whose content changed", changed_image_after_caching, None, None),
    # -- outputs follow the usual conventions
    Probe("output mode under the umask", "p2_inference", infer(), 0, "", lambda lab, tmp: (
        open(os.path.join(tmp, "kept.json"), "w").close(), os.chmod(os.path.join(tmp, "kept.json"), 0o640)),
        None, mode_is_plain),
    Probe("output through a symlink", "p2_inference", infer(), 0, "", symlink, None, still_a_link),
    Probe("output is a FIFO", "p2_inference", infer(), 2, "not a regular file", fifo, None,
          lambda tmp: stat.S_ISFIFO(os.stat(os.path.join(tmp, "out.json")).st_mode) or pytest.fail("replaced")),
    Probe("output is a device", "p1_clip_zeroshot", p1(out="{tmp}/out.json"), 2, "not a regular file",
          lambda lab, tmp: (p1_images(lab, tmp), device(lab, tmp)), None,
          lambda tmp: stat.S_ISCHR(os.stat(os.path.join(tmp, "out.json")).st_mode) or pytest.fail("replaced")),
    Probe("output is a directory", "p2_inference", infer(out="{tmp}"), 2, "is a directory", None, None, None),
    Probe("output folder read-only", "p2_inference", infer(out="{tmp}/ro/out.json"), 2, "cannot write to",
          read_only_folder, None, None),
    Probe("output folder is a file", "p2_inference", infer(out="{tmp}/file.txt/out.json"), 2, "file.txt",
          not_a_folder, None, None),
    Probe("training --out is a file", "p2_train", train("--out", "{tmp}/file.txt"), 2, "is not a folder",
          not_a_folder, None, None),
    Probe("P3 fails on the third image", "p3_visualize", p3(images="{tmp}/images", out="{tmp}/p3"), 2,
          "cannot read image", lambda lab, tmp: (p3_with_a_broken_third_image(lab, tmp), earlier_p3_folder(lab, tmp)),
          "p3/old.png", None),
    # -- tracebacks become one line naming the file or argument
    Probe("image claiming 20000x20000, P1", "p1_clip_zeroshot", p1(images="{tmp}/images"), 2, "zz_bomb.png",
          bomb_folder, "out.csv", None),
    Probe("image claiming 20000x20000, P2", "p2_inference", infer(images="{tmp}/images"), 2, "zz_bomb.png",
          bomb_folder, "out.json", None),
    Probe("image claiming 20000x20000, P3", "p3_visualize", p3(images="{tmp}/images"), 2, "zz_bomb.png",
          lambda lab, tmp: (bomb_folder(lab, tmp), earlier_p3_folder(lab, tmp)), "p3/old.png", None),
    Probe("image claiming 20000x20000, evaluation", "p2_evaluate",
          ["--pred_file", "{tmp}/pred.json", "--images_root", "{tmp}/images", "--annotation_file", "{tmp}/val.json",
           "--clip-model", "{clip}", "--clip-pretrained", "none", "--num-workers", "0", "--device", "cpu",
           "--per-image", "{tmp}/out.json"], 2, "zz_bomb.png", bomb_folder, "out.json", None),
    Probe("--lr 0", "p2_train", train("--lr", "0"), 2, "--lr must be above 0", None, None, None),
    Probe("--layer abc", "p3_visualize", p3("--layer", "abc"), 2, "--layer", None, None, None),
    Probe("--heads abc", "p3_visualize", p3("--heads", "abc"), 2, "--heads", None, None, None),
    Probe("--batch-size 0", "p3_visualize", p3("--batch-size", "0"), 2, "--batch-size", None, None, None),
    Probe("checkpoint recommends an unknown method", "p2_inference", infer(checkpoint="{tmp}/p2.pt"), 2,
          "method must be beam, greedy or sample",
          with_config(**{decoding.INFERENCE_KEY: dict(decoding.DECODE_DEFAULTS, method="nucleus", chosen_on="x")}),
          "out.json", None),
    Probe("checkpoint recommends 2.5 beams", "p2_inference", infer(checkpoint="{tmp}/p2.pt"), 2,
          "beam_size must be a whole number",
          with_config(**{decoding.INFERENCE_KEY: dict(decoding.DECODE_DEFAULTS, beam_size=2.5, chosen_on="x")}),
          "out.json", None),
]


def fill(args, lab, tmp):
    return [a.format(tmp=tmp, **lab) if isinstance(a, str) else a for a in args]


def run_script(script: str, argv) -> tuple:
    """(exit code, stderr is left to capsys) of `script`'s main through run_main, as `python3 script.py` runs it."""
    module = importlib.import_module(script)
    try:
        run_main(lambda: module.main(argv))
    except SystemExit as exit_:
        return (exit_.code or 0,)
    return (0,)


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_probe(probe, lab, tmp_path, capsys, monkeypatch):
    tmp = str(tmp_path)
    old_umask = os.umask(0o022)
    try:
        if probe.survives:
            path = os.path.join(tmp, probe.survives)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path):
                with open(path, "w") as f:
                    f.write(EARLIER)
        if probe.setup:
            probe.setup(lab, tmp)
        before = open(os.path.join(tmp, probe.survives), "rb").read() if probe.survives else None
        argv = train_args(lab, tmp, *probe.args[1:]) if probe.args[0] == "TRAIN" else fill(probe.args, lab, tmp)
        capsys.readouterr()
        code = run_script(probe.script, argv)[0]
        err = capsys.readouterr().err
    finally:
        os.umask(old_umask)
        ro = os.path.join(tmp, "ro")
        if os.path.isdir(ro) and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", ro], capture_output=True)
    assert code == probe.code, err[-2000:]
    if probe.code:
        last = err.strip().splitlines()[-1]
        assert last.startswith(("error:", "usage:")) or "error:" in last, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
    assert probe.fragment in err, err[-2000:]
    assert not os.path.exists(os.path.join(tmp, "MARKER")), "the file's payload ran"
    if probe.survives:
        assert open(os.path.join(tmp, probe.survives), "rb").read() == before, "the earlier output was changed"
    if probe.check:
        probe.check(tmp)
    leftovers = [n for n in os.listdir(tmp) if n.startswith(".") and n.endswith(".tmp")]
    assert not leftovers, leftovers
