"""run_all.py on inputs other than the finished small-world run of test_run_all.py, each a run of its own: another
captions file and images folder (no P1 or P3 data), and two processes under torchrun. A module apart from
test_run_all.py so that the other test worker runs it beside that module's long chain of runs (paragraph captions:
test_toolkit_run.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_models
from hw3 import REPO_ROOT as ROOT
from hw3.data import caption_files
from hw3.pipeline import records
from hw3.pipeline.stages import compare as compare_stage
from hw3.pipeline import trainings
from hw3.util.files import read_json
from miniworld import demo
from test_run_all import command, run

pytestmark = pytest.mark.usefixtures("short_grid")  # tests/e2e/conftest.py, as the world fixture


def test_another_dataset_runs_compare_and_report_alone(world, tmp_path, capsys):
    """--captions FILE --images DIR: no P1 or P3 data; without --decoder-weights no P2 (and no gpt2 row); a file
    without splits is trained on its train share and scored on its val share, as p2_train.py divides it."""

    p2 = os.path.join(world, "p2_data")
    config = str(tmp_path / "train_config.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump({r: dict(demo.SHORT_RUN, **tiny_models.TINY_COMPARE[r]) for r in compare_stage.COMPARE_RUNS}, f)
    profile = demo.profile(world, str(tmp_path / "unused"), demo.parse_args([]))
    models = profile[profile.index("--clip-model"):profile.index("--clip-model") + 4] + [
        "--encoder", profile[profile.index("--encoder") + 1]]
    argv = ["--captions", os.path.join(p2, "train.json"), "--images", os.path.join(p2, "images", "train"), "--out",
            str(tmp_path / "out"), "--train-config", config, "--device", "cpu", "--workers", "0"] + models
    code, err = run(argv + ["--data", world], capsys)
    assert code == 2 and "not both" in err
    code, err = run(argv, capsys)
    assert code == 0, err[-3000:]
    assert "no gpt2 row" in err
    results = read_json(str(tmp_path / "out" / "results.json"))
    assert set(results["compare"]) == set(compare_stage.COMPARE_ARCHS)
    assert "p2" not in results and "p1_accuracy" not in results
    val, _ = caption_files.split_names(caption_files.read_captions(read_json(os.path.join(p2, "train.json"))), "val", show=False)
    assert sorted(read_json(str(tmp_path / "out" / "compare" / "gru" / "pred.json"))) == sorted(
        os.path.splitext(n)[0] for n in val)
    assert os.path.isfile(str(tmp_path / "out" / "report.pdf"))


def torchrun_command(argv, port: int):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), os.path.join(ROOT, "run_all.py")] + argv


def test_torchrun_runs_p2_with_two_processes(world, tmp_path):
    """run_all.py under torchrun on the CPU (gloo): both processes train, rank 0 swaps the training in,
    scores and writes; the rerun skips."""
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available():
        pytest.skip("this torch has no torch.distributed")
    import socket

    out = str(tmp_path / "out")
    argv = command(world, out)
    argv[argv.index("--methods") + 1] = "lora"
    argv[argv.index("--train-config") + 1] = str(tmp_path / "lora.json")
    with open(str(tmp_path / "lora.json"), "w", encoding="utf-8") as f:
        json.dump(dict(lora=demo.SHORT_RUN), f)
    argv[argv.index("--train-max-images") + 1] = "16"
    argv += ["--only", "p2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    runs = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runs.append(subprocess.run(torchrun_command(argv, port), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, timeout=600))
        assert runs[-1].returncode == 0, runs[-1].stderr.decode()[-3000:]
    first, second = (r.stderr.decode() for r in runs)
    start = trainings.loss_log(os.path.join(out, "p2", "lora", "train"))[0]
    assert start["kind"] == "start" and start["world_size"] == 2
    assert not os.path.exists(os.path.join(out, "p2", "lora", "train", "last_state.pt"))  # finished: not resumed
    # Both train, one scores. A rank that starts after rank 0 wrote started.json reads it as an interrupted training
    # and says "resuming"; with no state file yet it starts from the beginning all the same.
    starts = first.count("== p2: training lora") + first.count("== p2: lora training was interrupted: resuming it")
    assert starts == 2 and first.count("== p2: training lora") >= 1 and first.count("== p2: done in") == 1
    assert not os.path.exists(os.path.join(out, "p2", "lora", "train.new"))
    assert read_json(records.record_path(out, "p2"))["results"]["p2_best"] == "lora"
    assert os.path.isfile(os.path.join(out, "p2", "p2_best.pt"))
    assert "== p2: done earlier" in second and "training lora" not in second
