"""run_all.py --captions on the paragraph world (miniworld.paragraphs: a DeepFashion captions.json of paragraphs)
without the GPT-2: the compare stage through the classic architectures, distill taught by the compare stage's best
architecture, scst fine-tuning it, and what results.json and results.md say of such a run.

The bar the scores must clear after a short run (six epochs of tiny models on 32 images) is a smoke bar: the best
architecture's CIDEr on val at least MIN_BEST_CIDER (one epoch on 64 paragraphs scored about 0.01; this run scores
about 0.13, while one constant training paragraph given for every val image scores about 1.3 on these 8 val images,
so the bar says the captioners learned the paragraphs' form, not that they beat a constant caption), and every
architecture's captions longer on average than the paragraphs' opening sentence (MIN_MEAN_WORDS), so that
paragraphs are scored. No caption that the compare or scst stage scores, nor the teacher's, may be cut (reach the
decode limit); the distill students are not held to it, since a few epochs on sampled paragraphs may not learn to
end them.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from hw3.pipeline.stages import compare as compare_stage
from hw3.pipeline.stages import distill as distill_stage
from hw3.pipeline import checks, plan
from hw3.util import resources, safe_load
from hw3.data import caption_files, datasets
from hw3.training.data import data_caption_tokens
from hw3.pipeline import records
from hw3.pipeline import run_all
from hw3.pipeline import context
from hw3.models import decoding
import tiny_models
from hw3.models.captioner import read_checkpoint_config
from hw3.util.files import read_json
from miniworld import demo, paragraphs
from test_run_all import run  # run_all as its command line runs it: (exit code, stderr)
from hw3.data.tokenizer import BPETokenizer

IMAGES = 40  # 32 train, 8 val by file-name hash
MAX_TOKENS = 64  # the paragraphs' longest is under 50 GPT-2 tokens
SHORT = 30  # search.DECODE_DEFAULTS' decode limit before data-derived lengths: it cuts some of the paragraphs
MIN_BEST_CIDER = 0.05
MIN_MEAN_WORDS = 8  # the longest opening sentence ("the picture shows three shapes on a gray background.") has 9
TRAINING = dict(epochs=6, batch_size=16, lr=3e-3, warmup_steps=2, log_every=4, val_max_images=8)  # lengths: the data's


@pytest.fixture(scope="module", autouse=True)
def long_decoding():
    """The README default alone in the decoding grid (the lengths are the data's: 30 tokens would cut paragraphs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(context, "DECODING_GRID", context.DECODING_GRID[:1])
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("paragraphs") / "world")
    paragraphs.write_paragraph_world(folder, 0, IMAGES)
    return folder


def base_argv(world: str, out: str, config: str):
    profile = demo.profile(world, os.path.join(os.path.dirname(out), "unused"), demo.parse_args([]))
    models = profile[profile.index("--clip-model"):profile.index("--clip-model") + 4] + [
        "--encoder", profile[profile.index("--encoder") + 1]]
    return ["--captions", os.path.join(world, "captions.json"), "--images", os.path.join(world, "images"), "--out",
            out, "--train-config", config, "--device", "cpu", "--workers", "0"] + models


def write_config(folder) -> str:
    config = str(folder / "train_config.json")
    entries = {r: dict(TRAINING, **tiny_models.TINY_COMPARE[r]) for r in compare_stage.COMPARE_RUNS}
    entries["distill"] = dict(TRAINING, epochs=2, **tiny_models.TINY_COMPARE["gru"])
    entries["scst"] = dict(scst_epochs=1, scst_samples=2, scst_lr=1e-4)
    with open(config, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return config


@pytest.fixture(scope="module")
def toolkit_run(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toolkit")
    out = str(tmp / "out")
    argv = base_argv(world, out, write_config(tmp)) + ["--with", "distill,scst"]
    assert run_all.main(argv) == 0
    return out, argv


def read_results(out: str) -> dict:
    """results.json with its <OUT>/... paths in `out` (the file names paths relative to the run's folder)."""
    def local(obj):
        if isinstance(obj, str):
            return records.local_path(obj, out)
        if isinstance(obj, dict):
            return {k: local(v) for k, v in obj.items()}
        return [local(v) for v in obj] if isinstance(obj, list) else obj
    return local(read_json(os.path.join(out, "results.json")))


TOKENIZER = BPETokenizer()  # built once: reading encoder.json and vocab.bpe takes a good part of a second


def token_count(caption: str) -> int:
    return len(TOKENIZER.encode(caption))


def test_no_scored_caption_is_cut_and_the_scores_clear_the_bar(toolkit_run):
    out, _ = toolkit_run
    results = read_results(out)
    scored = [os.path.join(out, "compare", run, "pred.json") for run in compare_stage.COMPARE_RUNS]
    scored += [results["scst"][side]["predictions"] for side in ("before", "after")]
    scored.append(results["distill"]["teacher"]["predictions"])
    for path in scored:
        captions = read_json(path)
        assert captions and max(token_count(c) for c in captions.values()) < MAX_TOKENS, path
    for row in (results["scst"]["before"], results["scst"]["after"], results["distill"]["teacher"]):
        assert row["cut"] == 0 and row["max_len"] > SHORT, row  # the val paragraphs are longer than 30 tokens
    table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    for arch, row in results["compare"].items():  # a few epochs: a weaker decoder may ramble to its last position
        positions = read_checkpoint_config(row["checkpoint"])["decoder"]["block_size"] - 1
        assert SHORT < row["max_len"] <= positions and (row["cut"] == 0 or "- compare %s: %d captions cut at %d " % (
            arch, row["cut"], row["max_len"]) in table), (arch, row)
    rows = results["compare"]
    assert set(rows) == set(compare_stage.COMPARE_ARCHS)
    assert max(rows[a]["CIDEr"] for a in rows) >= MIN_BEST_CIDER
    for arch in rows:
        captions = read_json(os.path.join(out, "compare", arch, "pred.json")).values()
        assert sum(len(c.split()) for c in captions) / len(captions) >= MIN_MEAN_WORDS, arch


def test_the_teacher_and_the_fine_tuned_are_the_best_architecture(toolkit_run):
    out, _ = toolkit_run
    results = read_results(out)
    rows = results["compare"]
    best = max(compare_stage.COMPARE_ARCHS, key=lambda a: rows[a]["CIDEr"])
    teacher = results["distill"]["teacher"]
    assert teacher["arch"] == best and teacher["checkpoint"] == rows[best]["checkpoint"]
    assert teacher["CIDEr"] == pytest.approx(rows[best]["CIDEr"])  # its val captions are the compare stage's
    assert "compare stage's best architecture" in teacher["chosen_on"]
    for name in ("precise", "creative"):
        info = caption_files.read_captions(os.path.join(out, "distill", "teacher_%s.json" % name))
        assert info.format == "coco" and len(info.captions) == results["data"]["splits"]["train"]
        assert teacher["decoding"][name]["max_len"] > SHORT  # the teacher's paragraphs are not cut at 30 tokens
    precise = caption_files.read_captions(os.path.join(out, "distill", "teacher_precise.json"))
    assert max(token_count(c) for caps in precise.captions for c in caps) < teacher["decoding"]["precise"]["max_len"]
    scst = results["scst"]
    assert scst["method"] == best and scst["settings"]["init_from"] == rows[best]["checkpoint"]
    assert scst["before"]["CIDEr"] == pytest.approx(rows[best]["CIDEr"])
    trained = read_checkpoint_config(scst["after"]["checkpoint"])
    assert trained["arch"] == best and trained["scst"]["scst_epochs"] == 1
    log = open(os.path.join(out, "run_all.log"), encoding="utf-8").read()
    assert "the teacher is %s" % best in log
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "The teacher is the %s captioner, the compare stage's best architecture" % best in report
    plan = [json.loads(line) for line in log.splitlines() if '"event": "plan"' in line][-1]
    assert plan["stages"] == ["compare", "distill", "scst", "report"]


def test_results_describe_the_data(toolkit_run, world):
    out, _ = toolkit_run
    data = read_results(out)["data"]
    captions = os.path.join(world, "captions.json")
    train = caption_files.load_captions(captions, os.path.join(world, "images"), split="train")
    val = caption_files.load_captions(captions, os.path.join(world, "images"), split="val")
    assert data["format"] == "deepfashion" and data["splits"] == dict(train=len(train.names), val=len(val.names))
    lengths = sorted(token_count(c) for caps in train.captions for c in caps)
    tokens = data["caption_tokens"]
    assert (tokens["min"], tokens["max"], tokens["captions"]) == (lengths[0], lengths[-1], len(lengths))
    assert tokens["min"] <= tokens["median"] <= tokens["p95"] <= tokens["max"]
    trained = data_caption_tokens(lengths[-1])  # the default length, from the training captions
    assert data["cut"] == {run: dict(max_caption_tokens=trained, cut=0) for run in compare_stage.COMPARE_RUNS}
    _, cut, _ = datasets.tokenize_captions(train.captions, BPETokenizer(), SHORT)  # p2_train.py's own count
    assert cut == sum(1 for n in lengths if n > SHORT) > 0  # the world's paragraphs exercise the long path


def test_compare_rows_are_scored_at_a_length_that_covers_the_val_paragraphs(toolkit_run, world):
    """The compare runs train at a length that covers the training paragraphs and are scored at one that covers the
    val paragraphs (capped by each decoder's positions); each row counts its cut captions, and results.md names every
    row that has some."""
    out, _ = toolkit_run
    captions, images = os.path.join(world, "captions.json"), os.path.join(world, "images")
    train = caption_files.load_captions(captions, images, split="train")
    val = caption_files.load_captions(captions, images, split="val")
    longest_train = max(token_count(c) for caps in train.captions for c in caps)
    longest_val = max(token_count(r) for refs in val.references for r in refs)
    assert longest_val > decoding.DECODE_DEFAULTS["max_len"]  # paragraphs: the default 30 would cut them
    table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    for arch, row in read_results(out)["compare"].items():
        meta = read_json(row["checkpoint"].replace(".pt", ".json"))
        assert meta["max_caption_tokens"] >= longest_train, arch  # trained on whole paragraphs
        assert row["max_len"] == min(longest_val + 1, meta["decoder"]["block_size"] - 1), arch
        assert 0 <= row["cut"] <= len(val.names)
        line = "- compare %s: %d captions cut at %d tokens" % (arch, row["cut"], row["max_len"])
        assert (line in table) == (row["cut"] > 0), arch


def test_results_hold_the_attention_maps_of_the_best_attentive_architecture(toolkit_run):
    out, _ = toolkit_run
    results = read_results(out)
    attention, rows = results["attention"], results["compare"]
    assert attention["arch"] == max(compare_stage.ATTENTIVE, key=lambda a: rows[a]["CIDEr"])
    assert len(attention["figures"]) == 2 * compare_stage.ATTENTION_IMAGES
    assert all(not os.path.isabs(f) and os.path.isfile(os.path.join(out, f)) for f in attention["figures"])
    per_image = read_json(os.path.join(out, "compare", attention["arch"], "per_image.json"))
    scores = {k: v["clipscore"] for k, v in per_image.items()}
    assert attention["best"]["CLIPScore"] == max(scores.values())
    assert attention["worst"]["CLIPScore"] == min(scores.values())
    predictions = read_json(os.path.join(out, "compare", attention["arch"], "pred.json"))
    for side in ("best", "worst"):
        entry = attention[side]
        assert entry["caption"] == predictions[entry["image"]] and entry["figure"] in attention["figures"]


def test_results_md_leaves_out_what_did_not_run(toolkit_run):
    out, _ = toolkit_run
    table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
    assert table.startswith("| data: deepfashion |")
    assert "| measure | value |" not in table and "PEFT" not in table
    for world_only in ("object_f1", "object f1", "pointing", "exact"):
        assert world_only not in table, world_only
    assert "| architecture | CIDEr | BLEU-4 | METEOR | ROUGE-L | CLIPScore | trainable params |" in table
    assert "attention maps of " in table and "(the teacher: " in table


def test_distill_or_scst_without_compare_is_refused_before_any_work(toolkit_run, world, tmp_path, capsys):
    _, argv = toolkit_run
    out = str(tmp_path / "fresh")
    fresh = base_argv(world, out, argv[argv.index("--train-config") + 1])
    for stage in ("distill", "scst"):
        code, err = run(fresh + ["--with", stage, "--only", stage], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "add compare to --only" in err and stage in err, err
        assert not os.path.exists(records.record_path(out, "compare"))
    code, err = run(fresh + ["--with", "scst", "--scst-method", "lora"], capsys)
    assert code == 2 and "--scst-method lora names a PEFT attempt, which needs --decoder-weights" in err


def test_a_finished_compare_lets_distill_run_alone(toolkit_run, tmp_path, capsys):
    """--only distill on an OUT whose compare stage is finished and still true: accepted (its record is read)."""
    out, argv = toolkit_run
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    argv = list(argv)
    argv[argv.index("--out") + 1] = copy
    code, err = run(argv + ["--only", "distill"], capsys)
    assert code == 0 and "== distill: done earlier" in err, err[-2000:]


def test_the_disk_estimate_sizes_each_training_from_its_own_model(toolkit_run, monkeypatch):
    """The plan's disk need for this run redone (its stages forced): each training's best.pt sized from the model it
    trains (a from-scratch decoder with the training captions' output layer), not the course's 35M-parameter limit:
    within the plan's margin of a tenth of what the trainings saved, and not twice it. (A distill student's output
    layer holds its teacher's captions' ids, as BPE re-reads the decoded text: sampled captions may hold ids the
    training captions lack, or fewer.)"""
    out, argv = toolkit_run
    ctx = context.Context(run_all.parse_args(argv + ["--force", "compare,distill,scst"]), argv)
    selected = checks.choose_stages(ctx, [s[0] for s in plan.stage_list(ctx)])
    checks.check_inputs(ctx, selected)
    need = {}
    monkeypatch.setattr(resources, "check_disk", lambda folder, sizes: need.update(sizes) or "")
    resources.plan_lines(ctx, selected)
    saved = [os.path.join(out, stage, run, "train", "best.pt") for stage, runs in (
        ("compare", compare_stage.COMPARE_RUNS), ("distill", distill_stage.CAPTION_SETS)) for run in runs]
    saved += glob.glob(os.path.join(out, "scst", "*", "train", "best.pt"))
    assert len(saved) == len(compare_stage.COMPARE_RUNS) + len(distill_stage.CAPTION_SETS) + 1
    saved_bytes = sum(t.numel() * t.element_size() for path in saved for t in safe_load.load_tensors(path).values()
                      if t.is_floating_point())  # the weights, not the output layer's id maps
    assert saved_bytes <= need["checkpoints"] * resources.DISK_MARGIN and need["checkpoints"] < 2 * saved_bytes, (
        saved_bytes, need)
    assert not glob.glob(os.path.join(out, "*", "*", "train", "last_state.pt"))  # finished: no resume state left
