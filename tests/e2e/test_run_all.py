"""run_all.py on the small world in the course's layout, with the demo's tiny models.

First the run a student makes (a kill between stages and the rerun that resumes, a finished command that skips every
stage, the shippable checkpoint hw3_2.sh can read), then the faults of a careless or hostile rerun as one table: each row copies the finished
output folder (and, if it changes them, the data), does one hostile or careless thing, and states the exit code, a
fragment of what run_all says, and which finished files must survive byte for byte.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest

from hw3.data import caption_files
from hw3.training import trainer
from hw3.pipeline import records
from hw3.report import answer_file
from hw3.report import published
from hw3.util import resources
from hw3.pipeline import run_all
from hw3.pipeline import context, runner, scoring, shipping, trainings
from hw3.pipeline.stages import (compare as compare_stage, distill as distill_stage, p2 as p2_stage, p3 as p3_stage,
                                report as report_stage, scst as scst_stage, shared)
from hw3.models import registry, decoding
import tiny_models
import torch
from hw3.training.state import STATE_FORMAT
from hw3.training.config import TrainingConfig, to_argv
from hw3.models.captioner import read_checkpoint_config
from hw3.util.errors import run_main
from hw3.util.files import read_json, write_json
from miniworld import demo

TRAINING = ["p2/%s/train/%s" % (m, f) for m in p2_stage.METHODS for f in ("best.pt", "best.json", "log.jsonl")]
FINISHED = TRAINING + ["p2/p2_best.pt", "p1/pred.csv", "results.json", "stages/p2.json"]


pytestmark = pytest.mark.usefixtures("short_grid")  # tests/e2e/conftest.py, as the world fixture


def command(data: str, out: str):
    """The demo's profile with the shared feature cache on (the product's default), without the opt-in stages; the
    distill options at run_all's defaults (one teacher caption, the students scored as trained): the demo's own
    test scores the committed students."""
    argv = demo.profile(data, out, demo.parse_args([]))
    argv.remove("--no-feature-cache")
    for option in ("--with", "--teacher-captions", "--score-students"):
        del argv[argv.index(option):argv.index(option) + 2]
    return argv


def run(argv, capsys):
    """run_all as its command line runs it: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        run_main(lambda: run_all.main(argv))
    return ended.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- what a stage reads

class StageReads:
    """The files each stage opens while it runs (Python's "open" audit event: open(), os.open, and so torch.load,
    PIL and numpy too) beside what its record names: a read file that no input or output of its record covers is a
    dependency the stage would not notice changing. Only the module fixtures' runs are watched."""

    def __init__(self):
        self.watching, self.opened, self.produced, self.missed = False, None, None, {}

    def audit(self, event: str, args) -> None:
        if self.opened is None or not args or not isinstance(args[0], (str, bytes)):
            return
        if event == "open":
            path, mode, flags = (list(args) + [None, 0])[:3]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            (self.produced if writes else self.opened).append(os.path.abspath(os.fsdecode(path)))
        elif event == "os.rename" and isinstance(args[1], (str, bytes)):
            self.produced.append(os.path.abspath(os.fsdecode(args[1])))

    def watch(self, ctx, name: str, function, ran: list):
        def stage(c):
            ran.append(name)
            self.opened, self.produced = [], []
            try:
                return function(c)
            finally:
                opened, produced, self.opened = self.opened, self.produced, None
                self.stage_read(ctx, name, opened, produced)
        return stage

    def stage_read(self, ctx, name: str, opened, produced) -> None:
        out = os.path.abspath(ctx.out)
        watched = (out, os.path.abspath(ctx.args.data), os.path.abspath(demo.MODELS))
        exempt = (os.path.join(out, "p2", "feature_cache"),  # keyed by the images' content hashes (p2_data)
                  os.path.join(out, *scoring.PARTS), os.path.join(out, "stages"),  # the runner's own records
                  os.path.abspath(ctx.args.train_config or out),  # its entries are in the settings, as options
                  os.path.join(out, answer_file.ANSWERS_FILE))  # the report's settings hold its answers' digest
        self.missed[name] = sorted({p for p in opened if under(p, watched) and not under(p, exempt)
                                    and not under(p, produced)})

    def check(self, ctx, name: str) -> None:
        """Called once the stage's record is written: keeps only the reads its record does not cover."""
        record = records.read_record(ctx.out, name)
        named = [os.path.abspath(ctx.local(p)) for p in record["inputs"]]
        named += [os.path.join(os.path.abspath(ctx.out), p) for p in record["outputs"]]
        self.missed[name] = [p for p in self.missed.get(name, []) if not under(p, named)]


def under(path: str, folders) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


@pytest.fixture(scope="module")
def reads():
    """The watcher, hooked into run_all's stage runner for the whole module (an audit hook cannot be removed, so it
    stays installed and idle)."""
    tracer = StageReads()
    sys.addaudithook(lambda event, args: tracer.audit(event, args))
    real = runner.run_stage

    def run_stage(ctx, name, function, selected):
        if not tracer.watching:
            return real(ctx, name, function, selected)
        ran = []
        real(ctx, name, tracer.watch(ctx, name, function, ran), selected)
        if ran:
            tracer.check(ctx, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_stage", run_stage)
        yield tracer


def watched_run(reads, argv) -> int:
    reads.watching = True
    try:
        return run_all.main(argv)
    finally:
        reads.watching = False


@pytest.fixture(scope="module")
def finished(world, reads, tmp_path_factory):
    """P1 alone (then 'killed'), then the whole command: P1 must be skipped, the rest run."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    argv = command(world, out)
    assert watched_run(reads, argv + ["--only", "p1"]) == 0
    assert os.path.isfile(records.record_path(out, "p1"))
    assert not os.path.exists(os.path.join(out, "p2"))
    assert watched_run(reads, argv) == 0
    return out, argv


def test_resume_skips_the_finished_stage_and_runs_the_rest(finished):
    out, argv = finished
    log = [line for line in open(os.path.join(out, "run_all.log"), encoding="utf-8")]
    assert any('"p1: done earlier' in line for line in log)
    results = read_json(os.path.join(out, "results.json"))
    ctx = context.Context(run_all.parse_args(argv), argv)
    assert results["command"] == ctx.portable_text(report_stage.command(ctx)) and "--out <OUT> " in results["command"]
    assert results["p1_accuracy"] >= 0.8 and max(r["cider"] for r in results["p2"].values()) >= 0.5
    assert set(results["p2"]) == set(p2_stage.METHODS) and all("object_f1" in r for r in results["p2"].values())
    assert len(results["p2_decoding"]) == len(context.DECODING_GRID) and results["pointing_trials"] > 0
    assert [e["image"] for e in results["p3_best_worst"]] and os.path.isdir(os.path.join(out, "p2", "feature_cache"))
    for name in ("results.md", "report.pdf", "p1/pred.top5.png", "p1/pred.prompts.md", "p2/loss_curves.png",
                 "p3/index.md", "p3/best_worst/index.md", "p2/p2_best.per_image.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    source = results["source"]
    assert source["command"] == results["command"] and source["versions"]["torch"] and "miniature world" in source[
        "note"]


def test_rows_list_only_the_active_peft_settings(finished):
    out, _ = finished
    rows = read_json(os.path.join(out, "results.json"))["p2"]
    for method, row in rows.items():
        assert set(row["peft"]) == set(registry.PEFT_OPTIONS[method]), method
    committed = read_json(os.path.join(demo.MODELS, "p2_lora.json"))["training"]  # the converged captioner scored
    assert {k: rows["lora"]["training"][k] for k in committed} == committed


def test_rerunning_a_finished_command_skips_every_stage(finished, capsys):
    out, argv = finished
    started = time.time()
    code, err = run(argv, capsys)
    assert code == 0
    for stage in ("p1", "p2", "p3", "miniworld.demo:world_stage", "report"):
        assert "== %s: done earlier" % stage in err and "still true" in err, stage
    assert time.time() - started < 30


def test_shipped_checkpoint_carries_the_chosen_decoding_and_no_local_path(finished):
    out, _ = finished
    results = read_json(os.path.join(out, "results.json"))
    meta = read_checkpoint_config(records.local_path(results["p2_shipping"]["checkpoint"], out))
    settings, said = decoding.resolve_decoding({}, meta, "p2_best.json")
    assert "chosen on" in said and meta["inference"]["chosen_on"].startswith("highest CIDEr on the val split")
    best = max(results["p2_decoding"], key=lambda d: d["cider"])
    assert settings.as_record() == {k: best[k] for k in decoding.DECODE_DEFAULTS}
    shipped = records.local_path(results["p2_shipping"]["checkpoint"], out)
    assert results["p2_shipping"]["bytes"] == os.path.getsize(shipped)
    shipped = open(os.path.join(out, "p2", "p2_best.json"), encoding="utf-8").read()
    for local in (out, os.path.abspath(out), os.path.dirname(os.path.abspath(out)), os.path.expanduser("~") + "/"):
        assert local not in shipped, local


def test_install_copies_the_best_checkpoint(finished, tmp_path, monkeypatch):
    out, argv = finished
    copy = copy_run(out, tmp_path)
    monkeypatch.setattr(shipping, "REPO_ROOT", str(tmp_path))
    assert run_all.main(argv_for(argv, out, copy) + ["--install"]) == 0
    assert os.path.isfile(str(tmp_path / "checkpoints" / "p2_best.pt"))
    assert "inference" in read_json(str(tmp_path / "checkpoints" / "p2_best.json"))


# ----------------------------------------------------------------------------------------------- the fault table

def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def copy_run(out: str, tmp_path) -> str:
    """A copy of the finished folder (times kept, as stage records compare them): moved folders stay finished."""
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    return copy


def argv_for(argv, out: str, copy: str, data: str = None):
    argv = [copy if a == os.path.relpath(out) or a == out else a for a in argv]
    if data:
        argv[argv.index("--data") + 1] = data
    return argv


def config(lab, options: dict, text: str = None) -> None:
    """A --train-config file: the demo's short runs with `options` added to lora's, or raw text."""
    with open(lab["config"], "w", encoding="utf-8") as f:
        f.write(text if text is not None else json.dumps(
            {m: dict(demo.SHORT_RUN, **(options if m == "lora" else {})) for m in p2_stage.METHODS}))
    lab["argv"][lab["argv"].index("--train-config") + 1] = lab["config"]


def copied_data(lab):
    data = os.path.join(lab["tmp"], "data")
    shutil.copytree(lab["world"], data)
    lab["argv"][lab["argv"].index("--data") + 1] = data
    return data


def truncate(path: str, keep: int) -> None:
    with open(path, "rb") as f:
        head = f.read(keep)
    with open(path, "wb") as f:
        f.write(head)


def val_image(data: str) -> str:
    folder = os.path.join(data, "p2_data", "images", "val")
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def swap_two_names(lab):
    path = os.path.join(copied_data(lab), "p1_data", "id2label.json")
    names = read_json(path)
    names["0"], names["1"] = names["1"], names["0"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(names, f)


def replace_val_captions(lab):
    path = os.path.join(copied_data(lab), "p2_data", "val.json")
    coco = read_json(path)
    for a in coco["annotations"]:
        a["caption"] = "a different caption"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f)


def read_only_parent(lab):
    parent = os.path.join(lab["tmp"], "ro")
    os.makedirs(parent)
    lab["argv"][lab["argv"].index("--out") + 1] = os.path.join(parent, "out")
    if os.geteuid() == 0:  # root ignores permission bits; an immutable folder refuses even root
        if subprocess.run(["chattr", "+i", parent], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here, and root ignores permission bits")
        lab["cleanup"] = lambda: subprocess.run(["chattr", "-i", parent], capture_output=True)
    else:
        os.chmod(parent, 0o555)


def out_is_a_file(lab):
    path = os.path.join(lab["tmp"], "a_file")
    open(path, "w").write("not a folder\n")
    lab["argv"][lab["argv"].index("--out") + 1] = path


def failing_training(lab):
    """p2_train writes into its folder, then dies: the finished training must not notice."""
    real = trainer.train

    def dies(config):
        folder = config.run.out
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "best.pt"), "wb").write(b"half")
        raise RuntimeError("killed in training")

    lab["patch"].setattr(trainer, "train", dies)
    lab["real_train"] = real


def failing_p3(lab):
    def dies(ctx):
        raise RuntimeError("killed in p3")

    lab["patch"].setattr(p3_stage, "stage_p3", dies)


def leftover_temporary(lab):
    os.makedirs(os.path.join(lab["out"], ".p3.abcd1234", "best_worst"))
    open(os.path.join(lab["out"], "p2", ".p2_best.json.x1y2z3w4.tmp"), "w").write("{")


def remove(*parts):
    return lambda lab: os.remove(os.path.join(lab["out"], *parts))


def both(*setups):
    def setup(lab):
        for s in setups:
            s(lab)
    return setup


def exists(*parts):
    return lambda lab, err: os.path.isfile(os.path.join(lab["out"], *parts))


def retrained(lab, err):
    return all("== p2: training %s" % m in err for m in p2_stage.METHODS) and "redone from its start" in err and \
        "is kept until the new one ends" in err


def installed(lab, err):
    return os.path.isfile(os.path.join(lab["tmp"], "checkpoints", "p2_best.pt")) and exists("p2", "p2_best.pt")(
        lab, err)


def record_kept(lab, err):
    return os.path.isfile(records.record_path(lab["out"], "p3"))


def no_temporaries(lab, err):
    return not os.path.exists(os.path.join(lab["out"], ".p3.abcd1234")) and not os.path.exists(
        os.path.join(lab["out"], "p2", ".p2_best.json.x1y2z3w4.tmp"))


def reshaped(*parts, **fields):
    """A JSON record rewritten with `fields` changed (a value of the wrong type), or replaced whole by `value`."""
    def setup(lab):
        path = os.path.join(lab["out"], *parts)
        record = fields["value"] if "value" in fields else dict(read_json(path), **fields)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f)
    return setup


def torn_last_line(*parts):
    def setup(lab):
        path = os.path.join(lab["out"], *parts)
        truncate(path, os.path.getsize(path) - 5)
    return setup


def lora_retrained(lab, err):
    return "== p2: training lora" in err and "training adapter" not in err and exists(
        "p2", "lora", "train", "best.pt")(lab, err)


def short_disk(lab):
    usage = shutil.disk_usage(lab["tmp"])
    lab["patch"].setattr(resources.shutil, "disk_usage", lambda path: usage._replace(free=10 ** 5))


def disk_fills_in_save_state(lab):
    """ENOSPC from the file while torch.save writes the training state, as a full disk gives it (torch then raises
    its own RuntimeError)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == STATE_FORMAT:
            f.write(b"PK\x03\x04 half")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:337] . unexpected pos 64 vs 0")
        return real(obj, f, *args, **kwargs)

    reshaped(LORA + "finished.json", value=[])(lab)
    lab["patch"].setattr(torch, "save", save)


def nothing_half_written_and_resumed(lab, err):
    """No temporary or state file in train.new; with space again, the same command goes on and finishes lora."""
    new = os.path.join(lab["out"], "p2", "lora", "train.new")
    if not os.path.isdir(new) or [n for n in os.listdir(new) if records.TEMPORARY.match(n)] or os.path.exists(
            os.path.join(new, "last_state.pt")):
        return False
    lab["patch"].undo()
    return run_all.main(lab["argv"] + ["--only", "p2"]) == 0 and not os.path.exists(new) and "checkpoint" in read_json(
        os.path.join(lab["out"], LORA + "finished.json"))


def out_of_memory_once(lab):
    """torch 1.12's CUDA out-of-memory error: once in lora's retraining, and in every caption search of more than 8
    images (validation, and the scoring's captioning)."""
    from hw3.models import captioner

    error = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 10.76 GiB total capacity)")
    forward, generate, raised = captioner.Captioner.forward, captioner.Captioner.generate, []

    def failing(real, kind):
        def call(self, visuals, *rest, **kwargs):
            if (kind == "forward" and self.training and not raised and len(visuals) > 1) or (
                    kind == "generate" and len(visuals) > 8):
                raised.append(kind)
                raise error
            return real(self, visuals, *rest, **kwargs)
        return call

    reshaped(LORA + "finished.json", value=[])(lab)
    shutil.rmtree(os.path.join(lab["out"], *scoring.PARTS))  # every row captioned again, not kept
    lab["patch"].setattr(captioner.Captioner, "forward", failing(forward, "forward"))
    lab["patch"].setattr(captioner.Captioner, "generate", failing(generate, "generate"))
    lab["adapter_captions"] = read_json(os.path.join(lab["out"], "p2", "adapter", "pred.json"))


def recorded_out_of_memory(lab, err):
    log = [json.loads(line) for line in open(os.path.join(lab["out"], "run_all.log"), encoding="utf-8")]
    return read_json(os.path.join(lab["out"], LORA + "finished.json"))["out_of_memory"][0]["pieces"] == 2 and any(
        e.get("event") == "out of memory" and e["where"] == "captioning" for e in log) and any(
        e.get("event") == "out of memory" and e["where"] == "validation" for e in log) and read_json(
        os.path.join(lab["out"], "p2", "adapter", "pred.json")) == lab["adapter_captions"]


LORA = "p2/lora/train/"
OTHER_TRAININGS = [f for f in TRAINING if not f.startswith(LORA)]


def changed_train_captions(lab):
    """Training captions changed in place: P2 trains again, and the scst stage, which trains on them too, must not
    call itself still true."""
    path = os.path.join(copied_data(lab), "p2_data", "train.json")
    coco = read_json(path)
    for a in coco["annotations"][::2]:
        a["caption"] = "a picture of shapes"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(coco, f)


def swapped_in_student(lab):
    """Another checkpoint swapped in for the human captions' student (as a training that ended, then a kill before
    its scoring): its row must be scored again, the other rows kept."""
    human = os.path.join(lab["out"], "distill", "human", "train")
    for name in ("best.pt", "best.json"):
        shutil.copy(os.path.join(lab["out"], "distill", "precise", "train", name), os.path.join(human, name))
    record = read_json(os.path.join(human, trainings.TRAIN_DONE))  # sealed as the training that wrote it would be
    write_json(os.path.join(human, trainings.TRAIN_DONE),
               dict(record, checkpoint=trainings.checkpoint_seal(os.path.join(human, "best.pt"))))


def rescored_only_the_swapped_row(lab, err):
    rows = read_json(os.path.join(lab["out"], "results.json"))["distill"]
    new = scoring.checkpoint_fingerprint(os.path.join(lab["out"], "distill", "human", "train", "best.pt"))
    return rows["human"]["checkpoint_fingerprint"] == new and "scoring distill/human/pred.json: done" not in err \
        and "distill: scoring distill/precise/pred.json: done earlier and still true, kept" in err


def moved_out(lab):
    """mv OUT NEW: the run goes on in NEW."""
    moved = os.path.join(lab["tmp"], "moved")
    os.rename(lab["out"], moved)
    inside = os.path.relpath(lab["base_out"]) + os.sep  # the demo's training config, written into OUT
    lab["argv"] = [os.path.join(moved, a[len(inside):]) if a.startswith(inside) else a
                   for a in argv_for(lab["argv"], lab["out"], moved)]
    lab["old"], lab["out"] = lab["out"], moved


def names_no_old_folder(lab, err):
    """No file of the moved OUT names the folder it was finished in (nor the fixture's, copied from)."""
    old = [lab["old"], lab["base_out"]]
    old = [p.encode("utf-8") for f in old for p in {f, os.path.abspath(f), os.path.relpath(f)}]
    found = []
    for root, _, files in os.walk(lab["out"]):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            found += [os.path.join(root, name) for p in old if p in data]
    assert not found, found
    return all("== %s: done earlier" % s in err for s in ("p1", "p2", "p3", "report"))


def runtime_options(lab):
    argv = lab["argv"]
    argv[argv.index("--workers") + 1] = "1"
    argv[argv.index("--device") + 1] = "auto"


def skipped_every_stage(lab, err):
    return "running again" not in err and "p2: training" not in err and all(
        "== %s: done earlier" % s in err for s in ("p1", "p2", "p3", "report"))


def killed_after_the_teacher_pass(lab):
    """--force distill (its parts are redone), killed once the teacher's captions and the human student's row are
    done; the second run (the row's) must redo neither."""
    real = distill_stage.train_run

    def dies(ctx, name, *rest):
        if name == "precise":
            raise RuntimeError("killed between parts")
        return real(ctx, name, *rest)

    lab["patch"].setattr(distill_stage, "train_run", dies)
    with pytest.raises(RuntimeError):
        run_all.main(lab["argv"] + ["--force", "distill", "--only", "distill"])
    lab["patch"].setattr(distill_stage, "train_run", real)


def kept_finished_parts(lab, err):
    kept = ["teacher captions teacher_precise.json: done earlier", "teacher captions teacher_creative.json: done "
            "earlier"] + ["scoring distill/%s/pred.json: done earlier" % n for n in distill_stage.CAPTION_SETS]
    return all(k in err for k in kept) and "distill: training" not in err and "distill: running again" in err


Row = namedtuple("Row", "id setup extra code fragment survives check base", defaults=("finished",))
ROWS = [
    # 1. a failed rerun never deletes the finished training
    Row("negative-lr", lambda lab: config(lab, {"lr": -0.001}), [], 2, "lora: --lr must be above 0", FINISHED, None),
    Row("unknown-key", lambda lab: config(lab, {"bogus_option": 1}), [], 2, "unrecognized arguments: --bogus-option",
        FINISHED, None),
    Row("truncated-train-png", lambda lab: truncate(
        os.path.join(copied_data(lab), "p2_data", "images", "train", "000003.png"), 300), [], 2, "is truncated",
        FINISHED, None),
    Row("training-dies", failing_training, ["--force", "p2", "--only", "p2"], "RuntimeError", "redone from its start",
        FINISHED, None),
    # 3. a stage is skipped only while its outputs are there
    Row("pred-csv-deleted", remove("p1", "pred.csv"), [], 0, "p1: running again: output p1/pred.csv is missing",
        [f for f in FINISHED if f not in ("p1/pred.csv", "results.json")], exists("p1", "pred.csv")),
    Row("p2-best-deleted-install", remove("p2", "p2_best.pt"), ["--install"], 0,
        "p2: running again: output p2/p2_best.pt is missing", TRAINING, installed),
    Row("best-pt-deleted-force", remove("p2", "lora", "train", "best.pt"), ["--force", "p2", "--only", "p2"], 0,
        "forced (--force p2)", [], retrained),
    # 4. data changed in place
    Row("class-names-swapped", swap_two_names, ["--only", "p1"], 0,
        "p1: running again: input changed: <DATA>/p1_data/id2label.json", TRAINING, None),
    Row("val-captions-replaced", replace_val_captions, ["--only", "p2"], 0,
        "p2: running again: input changed: <DATA>/p2_data/val.json", [], exists("p2", "lora", "train", "best.pt")),
    # 5. one line, not a traceback
    Row("out-is-a-file", out_is_a_file, [], 2, "is a file, not a folder", [], None),
    Row("out-parent-read-only", read_only_parent, [], 2, "cannot write to --out folder", [], None),
    Row("out-in-training-config", lambda lab: config(lab, {"out": "elsewhere"}), [], 2,
        "lora: out set by run_all.py itself", FINISHED, None),
    # 6. configuration errors before any work
    Row("config-not-json", lambda lab: config(lab, {}, text="{lora: "), [], 2, "is not valid JSON", FINISHED, None),
    Row("epochs-not-a-number", lambda lab: config(lab, {"epochs": "two"}), [], 2,
        "lora: argument --epochs: invalid int value: 'two'", FINISHED, None),
    # 7. smaller
    Row("zero-byte-image", lambda lab: truncate(val_image(copied_data(lab)), 0), [], 2, "cannot read image", FINISHED,
        None),
    Row("leftover-temporaries", leftover_temporary, [], 0, "removed 2 temporary file(s) of an interrupted run",
        FINISHED, no_temporaries),
    Row("force-outside-only", lambda lab: None, ["--only", "report", "--force", "p1"], 2,
        "--force p1: not among the stages to run", FINISHED, None),
    Row("failed-stage-keeps-record", failing_p3, ["--force", "p3"], "RuntimeError", "p3: running again: forced",
        FINISHED, record_kept),
    # a damaged record is not done, never a traceback
    Row("record-outputs-a-list", reshaped("stages", "p1.json", outputs=["p1/pred.csv"]), ["--only", "p1"], 0,
        "p1: running again: its record is damaged, so it counts as not done", TRAINING, None),
    Row("record-results-a-string", reshaped("stages", "p3.json", results="p3"), ["--only", "p3,report"], 0,
        "p3: running again: its record is damaged", TRAINING, None),
    Row("record-truncated-force", lambda lab: truncate(records.record_path(lab["out"], "report"), 40),
        ["--only", "report", "--force", "report"], 0, "report: running again: forced", TRAINING, None),
    Row("finished-json-holds-a-list", reshaped(LORA + "finished.json", value=[]), ["--only", "p2"], 0,
        "finished.json cannot be read or is not a training record, so the training counts as not finished",
        OTHER_TRAININGS, lora_retrained),
    Row("best-pt-truncated", lambda lab: truncate(os.path.join(lab["out"], LORA + "best.pt"), 1000), ["--only", "p2"],
        0, "best.pt no longer matches the size and hash in finished.json", OTHER_TRAININGS, lora_retrained),
    Row("torn-log-line", torn_last_line(LORA + "log.jsonl"), ["--only", "p2"], 0,
        "log.jsonl has a line that cannot be read", OTHER_TRAININGS, lora_retrained),
    # the disk
    Row("disk-short", short_disk, [], 2, "not enough disk space for this run in", FINISHED, None),
    Row("disk-fills-in-save-state", disk_fills_in_save_state, ["--only", "p2"], 2,
        "the disk is full: writing last_state.pt (the training state --resume continues from) in", TRAINING,
        nothing_half_written_and_resumed),
    # GPU memory and decoding settings
    Row("out-of-memory", out_of_memory_once, ["--only", "p2"], 0,
        "out of GPU memory in captioning at batch 12: going on with batch 6",
        OTHER_TRAININGS, recorded_out_of_memory),
    Row("infinite-scst-temperature", lambda lab: config(lab, {"scst_temperature": float("inf")}), [], 2,
        "lora: --scst-temperature must be a finite number, got inf", FINISHED, None),
    # 8. a stage's inputs are all it reads, OUT moves whole, runtime options, finished parts kept
    Row("scst-after-p2-change", changed_train_captions, ["--only", "p2,scst"], 0,
        "scst: running again: input changed: <DATA>/p2_data/train.json", [], None, "tuned"),
    Row("stale-row-after-kill", swapped_in_student, ["--only", "distill,miniworld.demo:world_stage,report"], 0,
        "distill: running again: output distill/human/train/best.pt changed", [], rescored_only_the_swapped_row,
        "distilled"),
    Row("moved-out", moved_out, [], 0, "report: done earlier", [], names_no_old_folder),
    Row("workers-and-device-spelling", runtime_options, [], 0, "p2: done earlier", FINISHED, skipped_every_stage),
    Row("restart-keeps-finished-parts", killed_after_the_teacher_pass, ["--only", "distill"], 0,
        "distill: running again", [], kept_finished_parts, "distilled"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_fault(row, request, world, tmp_path, capsys, monkeypatch):
    out, argv = request.getfixturevalue(row.base)[:2]
    copy = copy_run(out, tmp_path)
    lab = dict(out=copy, tmp=str(tmp_path), world=world, argv=argv_for(argv, out, copy),
               config=str(tmp_path / "train_config.json"), patch=monkeypatch, base_out=out)
    monkeypatch.setattr(shipping, "REPO_ROOT", str(tmp_path))  # --install copies into tmp_path/checkpoints
    before = {f: sha(os.path.join(copy, f)) for f in row.survives}
    row.setup(lab)
    try:
        if row.code == "RuntimeError":
            capsys.readouterr()
            with pytest.raises(RuntimeError):
                run_all.main(lab["argv"] + row.extra)
            code, err = "RuntimeError", capsys.readouterr().err
        else:
            code, err = run(lab["argv"] + row.extra, capsys)
    finally:
        lab.get("cleanup", lambda: None)()
    assert code == row.code, err[-3000:]
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert row.fragment in err, err[-3000:]
    copy = lab["out"]
    for f in row.survives:
        assert os.path.isfile(os.path.join(copy, f)) and sha(os.path.join(copy, f)) == before[f], f
    if row.check:
        assert row.check(lab, err), err[-3000:]
    results = os.path.join(copy, "results.json")
    for path in (read_json(results)["p2_shipping"]["checkpoint"],) + tuple(
            r["checkpoint"] for r in read_json(results)["p2"].values()):
        assert os.path.isfile(records.local_path(path, copy)), "results.json points at a missing file: %s" % path


def test_a_failed_training_leaves_a_rerun_that_skips(finished, tmp_path, capsys, monkeypatch):
    """After the training-dies row the same command without --force finds P2 still true (the half-written new
    training is not the finished one) and removes the abandoned folder."""
    out, argv = finished
    copy = copy_run(out, tmp_path)
    argv = argv_for(argv, out, copy)
    monkeypatch.setattr(trainer, "train", lambda config: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        run_all.main(argv + ["--force", "p2", "--only", "p2"])
    assert os.path.isdir(os.path.join(copy, "p2", "adapter", "train.new"))
    monkeypatch.undo()
    code, err = run(argv, capsys)
    assert code == 0 and "== p2: done earlier" in err
    assert not os.path.exists(os.path.join(copy, "p2", "adapter", "train.new"))


def test_interrupted_training_resumes(finished, tmp_path, capsys, monkeypatch):
    """A training killed after its first epoch continues with p2_train.py --resume when the command is run again."""
    out, argv = finished
    copy = copy_run(out, tmp_path)
    lab = dict(config=str(tmp_path / "train_config.json"), argv=argv_for(argv, out, copy))
    config(lab, {"epochs": 2})
    real = trainer.train

    def killed_after_one_epoch(config):
        real(config.replace(stop_after=1))
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", killed_after_one_epoch)
    code, _ = run(lab["argv"] + ["--only", "p2"], capsys)
    assert code == 130
    monkeypatch.undo()
    code, err = run(lab["argv"] + ["--only", "p2"], capsys)
    assert code == 0 and "lora training was interrupted: resuming it" in err and "resuming after epoch 1" in err
    assert "adapter training finished earlier" in err
    epochs = [line["epoch"] for line in trainings.loss_log(os.path.join(copy, "p2", "lora", "train"))
              if line.get("kind") == "epoch"]
    assert epochs == [1, 2]


def _background_run(argv, log: str):
    code = "import sys; from hw3.pipeline import run_all; from hw3.util.errors import run_main; run_main(lambda: run_all.main(sys.argv[1:]))"
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", code] + argv, cwd=os.getcwd(), stdout=subprocess.DEVNULL,
                                stderr=err)


def _wait_for_owner(out: str, process) -> dict:
    owner = os.path.join(out, records.OWNER_NAME)
    for _ in range(600):
        if os.path.isfile(owner) and read_json(owner).get("pid") == process.pid:
            return read_json(owner)
        assert process.poll() is None, "the first run ended before taking the lock"
        time.sleep(0.1)
    raise AssertionError("the first run never took the lock")


def test_a_second_run_on_the_same_out_stops_at_once(finished, tmp_path, capsys):
    out, argv = finished
    copy = copy_run(out, tmp_path)
    argv = argv_for(argv, out, copy) + ["--only", "p1", "--force", "p1"]
    log = str(tmp_path / "first.err")
    first = _background_run(argv, log)
    try:
        _wait_for_owner(copy, first)
        started = time.time()
        code, err = run(argv, capsys)
        assert code == 2 and "another run_all.py is running on" in err and "pid %d" % first.pid in err, err
        assert time.time() - started < 20
    finally:
        first.wait(timeout=600)
    assert first.returncode == 0, open(log).read()[-3000:]
    assert sum('"p1: running again' in line for line in open(os.path.join(copy, "run_all.log"))) == 1


def test_a_killed_runs_lock_is_taken_over(finished, tmp_path, capsys):
    out, argv = finished
    copy = copy_run(out, tmp_path)
    argv = argv_for(argv, out, copy) + ["--only", "p1"]
    first = _background_run(argv + ["--force", "p1"], str(tmp_path / "first.err"))
    _wait_for_owner(copy, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    code, err = run(argv, capsys)
    assert code == 0 and "another run_all.py" not in err


def test_a_cjk_path_prints_no_missing_glyphs(finished, tmp_path, capsys):
    """The source block's command names the files as given (a training config outside OUT here); characters the
    report's fonts lack become one line naming the font package, never empty boxes or warnings."""
    import warnings

    out, argv = finished
    copy = copy_run(out, tmp_path)
    argv = argv_for(argv, out, copy)
    config = str(tmp_path / "作業三" / "training.json")
    os.makedirs(os.path.dirname(config))
    shutil.copy(argv[argv.index("--train-config") + 1], config)
    argv[argv.index("--train-config") + 1] = config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run(argv + ["--force", "report"], capsys)
    assert code == 0, err[-3000:]
    assert not [w for w in caught if "missing from" in str(w.message) or "Glyph" in str(w.message)]
    assert "作業三" in read_json(os.path.join(copy, "results.json"))["source"]["command"]


def test_answers_survive_reruns_and_an_edited_answer_rebuilds_the_report(finished, tmp_path, capsys):
    """The student's answers.md is an input of the report stage: an edited answer reruns it (and only it), the
    answers appear in report.md, and no rerun touches the file."""

    out, argv = finished
    copy = copy_run(out, tmp_path)
    argv = argv_for(argv, out, copy)
    path = os.path.join(copy, answer_file.ANSWERS_FILE)
    text = open(path, encoding="utf-8").read()
    first, second = list(answer_file.read(copy))[:2]
    for qid, answer in ((first, "Reasonable: the cross is attended."), (second, "合理：注意力落在星形上。")):
        start = text.index("## [%s]" % qid)
        at = text.index(answer_file.PLACEHOLDER, start)
        text = text[:at] + answer + text[at + len(answer_file.PLACEHOLDER):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    code, err = run(argv, capsys)
    assert code == 0, err[-3000:]
    assert "report: running again" in err and "p2: running again" not in err
    markdown = open(os.path.join(copy, "report.md"), encoding="utf-8").read()
    assert "Reasonable: the cross is attended." in markdown and "合理：注意力落在星形上。" in markdown
    for extra in ([], ["--force", "report"]):
        code, err = run(argv + extra, capsys)
        assert code == 0 and open(path, encoding="utf-8").read() == text
    assert "report: running again" not in run(argv, capsys)[1]


def test_the_remaining_time_leaves_out_filling_the_cache(tmp_path):
    """The estimate after the first attempt counts what every attempt repeats (loading, then training from the
    "start" line on), not the feature cache it filled for all: 100 s in all, 60 s of filling -> 40 s per attempt."""
    folder = tmp_path / "train"
    folder.mkdir()
    start = dict(kind="start", time=round(time.time() - 30.0, 1), setup_seconds=10.0)
    (folder / "log.jsonl").write_text(json.dumps(start) + "\n")
    assert trainings.repeatable_seconds(str(folder), 100.0, resumed=False) == pytest.approx(40.0, abs=1.0)
    assert trainings.repeatable_seconds(str(folder), 100.0, resumed=True) is None


# ----------------------------------------------------------------------------------------------- the compare stage

def report_text(out: str) -> str:
    from hw3.report import compose

    return "\n".join(compose.compose(out).lines)


def test_compare_is_opt_in(finished):
    """Without --with compare the run is today's: no compare stage in the plan, results or report."""
    out, argv = finished
    results = read_json(os.path.join(out, "results.json"))
    assert "compare" not in results and "ablation" not in results
    assert not os.path.exists(records.record_path(out, "compare")) and not os.path.exists(os.path.join(out, "compare"))
    plan = [json.loads(line) for line in open(os.path.join(out, "run_all.log")) if '"event": "plan"' in line][-1]
    assert "compare" not in plan["stages"]
    assert "seed 004" not in open(os.path.join(out, "results.md")).read()
    assert "Architecture comparison" not in report_text(out)


@pytest.fixture(scope="module")
def compared(finished, reads, tmp_path_factory):
    """The finished run, then --with compare with tiny from-scratch configs: only compare, the world stage (its
    upstream changed) and the report run."""
    out, argv = finished
    tmp = tmp_path_factory.mktemp("compared")
    copy = str(tmp / "out")
    shutil.copytree(out, copy)
    config = str(tmp / "train_config.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump(dict({m: demo.SHORT_RUN for m in p2_stage.METHODS}, **{
            r: dict(demo.SHORT_RUN, **tiny_models.TINY_COMPARE[r]) for r in compare_stage.COMPARE_RUNS}), f)
    argv = argv_for(argv, out, copy) + ["--with", "compare"]
    argv[argv.index("--train-config") + 1] = config
    assert watched_run(reads, argv) == 0
    return copy, argv


def test_compare_results_hold_every_architecture(compared):
    out, _ = compared
    results = read_json(os.path.join(out, "results.json"))
    rows = results["compare"]
    assert set(rows) == {"gru", "attention-gru", "transformer", "gpt2"}
    keys = shared.ROW_KEYS + compare_stage.WORLD_SCORES + ("trainable_params", "train_seconds")
    for arch, row in rows.items():
        assert set(keys) <= set(row), arch
        assert row["CIDEr"] >= 0 and 0 <= row["object_f1"] <= 1 and row["trainable_params"] > 0, arch
    assert rows["gru"]["pointing_game"] is None  # no attention map
    for run in ("attention-gru", "transformer", "attention-gru_reg0"):  # played (None: no colour-shape word named)
        assert os.path.isfile(os.path.join(out, "compare", run, "pointing.json")), run
    assert not os.path.exists(os.path.join(out, "compare", "gru", "pointing.json"))
    assert all(rows[a]["pointing_game"] is None or 0 <= rows[a]["pointing_game"] <= 1 for a in rows)
    best = results["p2_best"]
    assert rows["gpt2"]["CIDEr"] == pytest.approx(results["p2"][best]["cider"]) and rows["gpt2"]["peft"] == best
    assert rows["gpt2"]["trainable_params"] == results["p2"][best]["trainable_params"]
    ablation = results["ablation"]
    assert [ablation[n]["attention_reg"] for n in compare_stage.ABLATION] == [1.0, 0.0]
    assert all(ablation[n]["CIDEr"] is not None and "pointing_game" in ablation[n] for n in ablation)
    # trained as P2's attempts are: the shared feature cache, a finished record
    for run in compare_stage.COMPARE_RUNS:
        record = read_json(os.path.join(out, "compare", run, "train", trainings.TRAIN_DONE))
        assert "<OUT>/p2/feature_cache" in record["argv"] and "--arch" in record["argv"], run
    assert "compare" in results["timings"]["stages"] and set(results["timings"]["compare_train"]) == set(
        compare_stage.COMPARE_RUNS)


def test_compare_section_in_results_md_and_report(compared):
    out, _ = compared
    table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert "| architecture | CIDEr | BLEU-4 | METEOR | ROUGE-L | CLIPScore |" in table and "| gpt2 (" in table
    assert published.COURSE_PROJECT_REPORT in table and "1.618" in table
    assert "| 0 (attention-gru_reg0) |" in table
    text = report_text(out)
    for fragment in ("Architecture comparison", "Beside the published DeepFashion table",
                     "ResNet-101 grid + attention GRU", "1.275", "Ablation: the doubly stochastic attention term",
                     "published model"):
        assert fragment in text, fragment


def test_compare_record_skips_and_its_trainings_are_reused(compared, tmp_path, capsys):
    out, argv = compared
    copy = copy_run(out, tmp_path)
    argv = argv_for(argv, out, copy)
    code, err = run(argv, capsys)
    assert code == 0 and "== compare: done earlier" in err and "still true" in err
    code, err = run(argv + ["--only", "report", "--force", "report"], capsys)  # not selected: kept while true
    assert code == 0 and "compare" in read_json(os.path.join(copy, "results.json"))
    os.remove(records.record_path(copy, "compare"))
    code, err = run(argv + ["--only", "compare,report"], capsys)
    assert code == 0 and "== compare: starting" in err
    for run_name in compare_stage.COMPARE_RUNS:
        assert "compare: %s training finished earlier with these settings and data, skipping" % run_name in err


def test_with_names_only_optional_stages(finished, tmp_path, capsys):
    out, argv = finished
    code, err = run(argv_for(argv, out, copy_run(out, tmp_path)) + ["--with", "p3"], capsys)
    assert code == 2 and "--with p3: not an opt-in stage (distill, compare, scst)" in err
    code, err = run(argv_for(argv, out, copy_run(out, tmp_path / "again")) + ["--only", "compare"], capsys)
    assert code == 2 and "opt-in: add --with compare" in err


# ----------------------------------------------------------------------------------------------- distill (opt-in)

@pytest.fixture(scope="module")
def distilled(finished, reads, tmp_path_factory):
    """The finished run's copy with --with distill: the stage alone (P2's results still true), then the world's
    measures and the report; the students are the demo's short runs, scored as trained."""
    out, argv = finished
    copy = copy_run(out, tmp_path_factory.mktemp("distill"))
    argv = argv_for(argv, out, copy) + ["--with", "distill"]
    assert watched_run(reads, argv + ["--only", "distill,miniworld.demo:world_stage,report"]) == 0
    return copy, argv


def test_distill_is_opt_in(finished, capsys):
    out, argv = finished
    assert "distill" not in read_json(os.path.join(out, "results.json"))
    assert not os.path.exists(os.path.join(out, "distill"))
    code, err = run(argv + ["--only", "distill"], capsys)
    assert code != 0 and "opt-in: add --with distill" in err


def test_distill_teacher_captions_are_coco_files_the_students_read(distilled):
    out, _ = distilled
    train_names = {i["file_name"] for i in read_json(os.path.join(out, "p2", "train_subset.json"))["images"]}
    for name in ("precise", "creative"):
        path = os.path.join(out, "distill", "teacher_%s.json" % name)
        captions = caption_files.read_captions(path)
        assert captions.format == "coco" and set(captions.captions) == train_names
        assert all(len(c) == 1 and c[0] for c in captions.captions.values())
        trained = read_json(os.path.join(out, "distill", name, "train", "args.json"))
        assert os.path.abspath(records.local_path(trained["train_json"], out)) == os.path.abspath(path)


def test_distill_students_differ_only_in_their_captions(distilled):
    out, _ = distilled
    argvs = {n: read_json(os.path.join(out, "distill", n, "train", trainings.TRAIN_DONE))["argv"]
             for n in distill_stage.CAPTION_SETS}
    at = argvs["human"].index("--train-json") + 1
    assert len({a[at] for a in argvs.values()}) == 3
    assert all(a[:at] + a[at + 1:] == argvs["human"][:at] + argvs["human"][at + 1:] for a in argvs.values())
    assert argvs["human"][argvs["human"].index("--arch") + 1] == "gru"


def test_distill_results_hold_every_measure(distilled):
    out, _ = distilled
    rows = read_json(os.path.join(out, "results.json"))["distill"]
    assert list(rows) == ["teacher", "human", "precise", "creative"]
    for name, row in rows.items():
        for key in shared.ROW_KEYS + ("object_f1", "captions_per_image"):
            assert row.get(key) is not None or key == "METEOR", (name, key)
    assert rows["teacher"]["decoding"]["creative"]["temperature"] == 0.9
    assert rows["human"]["captions_per_image"] == 5 and rows["precise"]["captions_per_image"] == 1
    assert "distill: trained on" in open(os.path.join(out, "results.md"), encoding="utf-8").read()


def test_creative_teacher_captions_repeat_with_the_same_seed(distilled, tmp_path):
    out, argv = distilled
    ctx = context.Context(run_all.parse_args(argv), argv)
    ctx.results = ctx.local(read_json(os.path.join(out, "results.json")))  # its paths are <OUT>/...
    teacher = distill_stage.best_captioner(ctx)
    assert teacher["arch"] == "gpt2" and teacher["checkpoint"] == ctx.results["p2_shipping"]["checkpoint"]
    creative = distill_stage.teacher_decodings(ctx, teacher["decoding"])["creative"]
    human = os.path.join(out, "p2", "train_subset.json")
    again = distill_stage.teacher_captions(ctx, creative, human, str(tmp_path / "again.json"), teacher["checkpoint"])
    assert open(again, "rb").read() == open(os.path.join(out, "distill", "teacher_creative.json"), "rb").read()
    other = distill_stage.teacher_captions(ctx, dict(creative, seed=1), human, str(tmp_path / "other.json"),
                                             teacher["checkpoint"])
    assert read_json(other)["annotations"] != read_json(again)["annotations"]


# ----------------------------------------------------------------------------------------------- scst (opt-in)

@pytest.fixture(scope="module")
def tuned(finished, reads, tmp_path_factory):
    """The finished run's copy with --with scst (the demo's --scst-method lora): one short self-critical epoch from
    lora's scored checkpoint (the committed converged one) and, scored in its place, the committed p2_lora_scst.pt;
    then the world and the report."""
    out, argv = finished
    copy = copy_run(out, tmp_path_factory.mktemp("scst"))
    argv = argv_for(argv, out, copy) + ["--with", "scst"]
    config = argv[argv.index("--train-config") + 1]
    short = read_json(config)
    assert watched_run(reads, argv + ["--only", "scst,miniworld.demo:world_stage,report"]) == 0
    return copy, argv, short


def test_scst_is_opt_in(finished, capsys):
    out, argv = finished
    assert "scst" not in read_json(os.path.join(out, "results.json")) and not os.path.exists(os.path.join(out, "scst"))
    code, err = run(argv + ["--only", "scst"], capsys)
    assert code != 0 and "opt-in: add --with scst" in err


def test_scst_fine_tunes_the_chosen_attempts_scored_checkpoint(tuned):
    out, argv, short = tuned
    results = read_json(os.path.join(out, "results.json"))
    scst = results["scst"]
    method = scst["method"]
    assert method == argv[argv.index("--scst-method") + 1] == demo.SCST_METHOD
    record = read_json(os.path.join(out, "scst", method, "train", trainings.TRAIN_DONE))
    trained_argv = record["argv"]
    init = trained_argv[trained_argv.index("--init-from") + 1]
    assert os.path.abspath(init) == os.path.abspath(results["p2"][method]["checkpoint"])
    assert trained_argv[trained_argv.index("--peft") + 1] == method and "0" == trained_argv[
        trained_argv.index("--epochs") + 1]
    assert trained_argv[trained_argv.index("--scst-epochs") + 1] == str(short["scst"]["scst_epochs"])
    assert "<OUT>/p2/feature_cache" in trained_argv
    trained = read_checkpoint_config(os.path.join(out, "scst", method, "train", "best.pt"))
    assert trained["scst"]["scst_epochs"] == short["scst"]["scst_epochs"] and trained["phase"] in ("init", "scst")
    assert [json.loads(line)["phase"] for line in open(os.path.join(out, "scst", method, "train", "log.jsonl"))
            if '"kind": "epoch"' in line] == ["init"] + ["scst"] * short["scst"]["scst_epochs"]  # no cross-entropy
    assert scst["settings"]["decoding"] == {k: v for k, v in results["p2_inference"].items() if k != "chosen_on"}
    # --score-checkpoints: the committed fine-tuned checkpoint is the one scored "after", and ships
    assert os.path.samefile(scst["after"]["checkpoint"], os.path.join(demo.MODELS, "p2_%s_scst.pt" % method))
    shipped = read_checkpoint_config(os.path.join(out, "scst", "p2_scst.pt"))  # hw3_2.sh-ready, as p2_best is
    assert shipped[decoding.INFERENCE_KEY] == results["p2_inference"] and scst["shipping"]["sha256"] == sha(
        scst["after"]["checkpoint"])


def test_scst_results_hold_before_and_after(tuned):
    from hw3.evaluation import metrics
    from miniworld import world as world_lib

    out, argv, _ = tuned
    results = read_json(os.path.join(out, "results.json"))
    scst = results["scst"]
    data = argv[argv.index("--data") + 1]
    scenes = world_lib.scenes_of(read_json(os.path.join(data, "p2_data", "val_objects.json")))
    captions = {}
    for side in ("before", "after"):
        row = scst[side]
        for key in ("CIDEr", "CLIPScore", "BLEU-4", "object_f1", "exact_object_set"):
            assert isinstance(row[key], float), (side, key)
        captions[side] = read_json(records.local_path(row["predictions"], out))
        scores = metrics.evaluate(captions[side], os.path.join(data, "p2_data", "val.json"),
                                  os.path.join(data, "p2_data", "images", "val"), metrics.Scoring(metrics=("cider",)))
        assert row["CIDEr"] == pytest.approx(scores["CIDEr"]), side
        assert row["object_f1"] == pytest.approx(world_lib.object_scores(captions[side], scenes)["object_f1"]), side
    if scst["method"] == results["p2_best"]:  # "before" is P2's shipped captions: the decoding table's chosen row
        chosen = [d for d in results["p2_decoding"] if scoring.setting_name(d) == scoring.setting_name(
            results["p2_inference"])][0]
        assert scst["before"]["CIDEr"] == pytest.approx(chosen["cider"])
    else:  # captioned from the attempt's own checkpoint with the shipped decoding
        assert scst["before"]["predictions"].endswith(os.path.join("scst", scst["method"], "before.json"))
    for c in scst["changed"]:
        assert captions["before"][c["image"]] == c["before"] != c["after"] == captions["after"][c["image"]]
        assert isinstance(c["objects_right_before"], bool)
    gains = [c["cider_after"] - c["cider_before"] for c in scst["changed"]]
    ups, downs = [g for g in gains if g > 0], [g for g in gains if g < 0]
    assert gains == ups + downs and ups == sorted(ups, reverse=True) and downs == sorted(downs)
    assert len(ups) <= scst_stage.CHANGED_CAPTIONS[0] and len(downs) <= scst_stage.CHANGED_CAPTIONS[1]


def test_scst_section_in_results_md_and_report(tuned):
    out, _, _ = tuned
    table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert "| scst: " in table and "| before |" in table and "| after |" in table
    text = report_text(out)
    for fragment in ("Self-critical fine-tuning", "CIDEr after / before", "exact set"):
        assert fragment in text, fragment


def test_scst_record_skips_and_its_training_is_reused(tuned, tmp_path, capsys):
    out, argv, _ = tuned
    copy = copy_run(out, tmp_path)
    argv = argv_for(argv, out, copy)
    code, err = run(argv, capsys)
    assert code == 0 and "== scst: done earlier" in err
    os.remove(records.record_path(copy, "scst"))
    code, err = run(argv + ["--only", "scst,report"], capsys)
    method = read_json(os.path.join(copy, "results.json"))["scst"]["method"]
    assert code == 0 and "scst: %s training finished earlier with these settings and data, skipping" % method in err


def test_scst_options_are_checked_before_any_work(finished, tmp_path, capsys):
    out, argv = finished
    copy = copy_run(out, tmp_path)
    config = str(tmp_path / "bad.json")
    for entry, said in ((dict(scst_lr=0), "--scst-lr and --scst-temperature above 0"),
                        (dict(init_from="x.pt"), "init_from set by run_all.py itself"),
                        (dict(epochs=3), "epochs set by run_all.py itself"),
                        (dict(scst_samples=1), "--scst-samples must be at least 2")):
        with open(config, "w", encoding="utf-8") as f:
            json.dump(dict(read_json(argv[argv.index("--train-config") + 1]), scst=entry), f)
        bad = argv_for(argv, out, copy) + ["--with", "scst"]
        bad[bad.index("--train-config") + 1] = config
        code, err = run(bad, capsys)
        assert code == 2 and said in err and "scst" in err, (entry, err[-500:])
        assert not os.path.exists(os.path.join(copy, "scst"))


def test_option_flags_keep_zero_values():
    """A --train-config value of 0 is passed on (it once compared equal to False and was dropped, so --epochs 0 and
    "warmup_steps": 0 silently became p2_train.py's defaults)."""
    assert to_argv(TrainingConfig.from_options(dict(epochs=0, warmup_steps=0.0, augment=True, no_amp=False, seed=None,
                                                     lora_targets=["a", "b"]))) == [
        "--epochs", "0", "--warmup-steps", "0.0", "--augment", "--lora-targets", "a,b"]


def test_scst_flag_is_the_opt_in_stage(finished):
    """--scst (the spelling the toolkit's docs use) is --with scst; with --with naming other stages too, once."""
    _, argv = finished
    assert run_all.parse_args(argv + ["--scst"]).with_stages == ["scst"]
    assert run_all.parse_args(argv + ["--with", "compare,scst", "--scst"]).with_stages == ["compare", "scst"]
    assert run_all.parse_args(argv).with_stages == []


def test_scst_method_must_be_an_attempt(finished, tmp_path, capsys):
    out, argv = finished
    bad = argv_for(argv, out, copy_run(out, tmp_path)) + ["--with", "scst"]
    bad[bad.index("--scst-method") + 1] = "prompt"
    code, err = run(bad, capsys)
    assert code == 2 and "--scst-method prompt is not among --methods adapter,prefix,lora" in err


def test_every_file_a_stage_reads_is_among_its_recorded_inputs(reads, finished, compared, distilled, tuned):
    """Each stage, the opt-in ones included, as the module's fixtures ran it: every file under OUT, DATA or the
    models folder that it opened (and had not written itself) is an input or an output of its record."""
    stages = ("p1", "p2", "p3", "compare", "distill", "scst", "miniworld.demo:world_stage", "report")
    assert set(stages) <= set(reads.missed), sorted(reads.missed)
    missed = {s: m for s, m in reads.missed.items() if m}
    assert not missed, json.dumps(missed, indent=1)
