"""run_all.py end to end on the small world in the course's layout, with the demo's tiny models: a kill between
stages and the rerun that resumes, a finished command that skips every stage, an interrupted training that resumes,
bad data refused before any work, and the shippable checkpoint hw3_2.sh can read."""
from __future__ import annotations

import os
import shutil
import time

import pytest

import run_all
import search
from captioner import read_checkpoint_config
from common import UserError, read_json
from miniworld import demo, generate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("world") / "data")
    generate.generate(folder, 0, True, "course", os.path.join(demo.MODELS, "decoder_model.bin"))
    return folder


def command(data: str, out: str):
    """The demo's profile with the shared feature cache on (the product's default)."""
    argv = demo.profile(data, out, demo.parse_args([]))
    argv.remove("--no-feature-cache")
    return argv


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """P1 alone (then 'killed'), then the whole command: P1 must be skipped, the rest run."""
    out = str(tmp_path_factory.mktemp("run"))
    argv = command(world, out)
    assert run_all.main(argv + ["--only", "p1"]) == 0
    assert os.path.isfile(os.path.join(out, run_all.STAGE_DIR, "p1.json"))
    assert not os.path.exists(os.path.join(out, "p2"))
    assert run_all.main(argv) == 0
    return out, argv


def test_resume_skips_the_finished_stage_and_runs_the_rest(finished):
    out, argv = finished
    log = [line for line in open(os.path.join(out, "run_all.log"), encoding="utf-8")]
    assert any('"p1: done earlier' in line for line in log)
    results = read_json(os.path.join(out, "results.json"))
    assert results["command"] == run_all.command(run_all.Context(run_all.parse_args(argv), argv))
    assert results["p1_accuracy"] >= 0.8 and max(r["cider"] for r in results["p2"].values()) >= 0.5
    assert set(results["p2"]) == set(run_all.METHODS) and all("object_f1" in r for r in results["p2"].values())
    assert len(results["p2_decoding"]) == len(run_all.DECODING_GRID) and results["pointing_trials"] > 0
    assert [e["image"] for e in results["p3_best_worst"]] and os.path.isdir(os.path.join(out, "p2", "feature_cache"))
    for name in ("results.md", "report.pdf", "p1/pred.top5.png", "p1/pred.prompts.md", "p2/loss_curves.png",
                 "p3/index.md", "p3/best_worst/index.md", "p2/p2_best.per_image.json"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_rerunning_a_finished_command_skips_every_stage(finished, capsys):
    out, argv = finished
    capsys.readouterr()
    started = time.time()
    assert run_all.main(argv) == 0
    err = capsys.readouterr().err
    for stage in ("p1", "p2", "p3", "miniworld.demo:world_stage", "report"):
        assert "== %s: done earlier" % stage in err, stage
    assert time.time() - started < 30


def test_shipped_checkpoint_carries_the_chosen_decoding(finished):
    out, _ = finished
    results = read_json(os.path.join(out, "results.json"))
    meta = read_checkpoint_config(results["p2_shipping"]["checkpoint"])
    settings, said = search.resolve_decoding({}, meta, "p2_best.json")
    assert "chosen on" in said and meta["inference"]["chosen_on"].startswith("highest CIDEr on")
    best = max(results["p2_decoding"], key=lambda d: d["cider"])
    assert settings == {k: best[k] for k in search.DECODE_DEFAULTS}
    assert results["p2_shipping"]["bytes"] == os.path.getsize(results["p2_shipping"]["checkpoint"])


def test_interrupted_training_resumes(finished, capsys):
    """A training without its finished marker but with its state is continued with p2_train.py --resume."""
    out, argv = finished
    os.remove(os.path.join(out, "p2", "lora", "train_done.json"))
    capsys.readouterr()
    assert run_all.main(argv + ["--force", "p2", "--only", "p2"]) == 0
    err = capsys.readouterr().err
    assert "lora training was interrupted: resuming it" in err and "adapter training finished earlier" in err


def test_a_failing_stage_leaves_the_earlier_ones_done(finished, monkeypatch, capsys):
    out, argv = finished

    def broken(ctx):
        raise RuntimeError("killed")

    monkeypatch.setattr(run_all, "stage_p3", broken)
    with pytest.raises(RuntimeError):
        run_all.main(argv + ["--force", "p3"])
    assert not os.path.isfile(os.path.join(out, run_all.STAGE_DIR, "p3.json"))
    monkeypatch.undo()
    capsys.readouterr()
    assert run_all.main(argv) == 0
    err = capsys.readouterr().err
    assert "== p1: done earlier" in err and "== p2: done earlier" in err and "== p3: starting" in err


def test_install_copies_the_best_checkpoint(finished, tmp_path, monkeypatch):
    out, argv = finished
    monkeypatch.setattr(run_all, "HERE", str(tmp_path))
    assert run_all.main(argv + ["--install"]) == 0
    assert os.path.isfile(str(tmp_path / "checkpoints" / "p2_best.pt"))
    assert "inference" in read_json(str(tmp_path / "checkpoints" / "p2_best.json"))


def broken_copy(world, tmp_path, change):
    data = str(tmp_path / "data")
    shutil.copytree(world, data)
    change(data)
    return data


@pytest.mark.parametrize("change, words", [
    (lambda d: shutil.rmtree(os.path.join(d, "p2_data", "images", "val")), "p2_data/images/val"),
    (lambda d: os.remove(os.path.join(d, "p2_data", "images", "train", "000001.png")), "train.json"),
    (lambda d: open(os.path.join(d, "p1_data", "id2label.json"), "w").write('{"0": "red circle"}'), "id2label"),
])
def test_bad_data_is_one_line_before_any_work(world, tmp_path, change, words):
    data = broken_copy(world, tmp_path, change)
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        run_all.main(command(data, out))
    assert not os.path.exists(os.path.join(out, run_all.STAGE_DIR))
