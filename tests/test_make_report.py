"""make_report.py on a results folder of the course's layout (no miniature-world fields) and on one with them: the
report answers every question of the homework, says only what the results hold, lists only the active settings and
draws every character it is given, without warnings."""
from __future__ import annotations

import copy
import json
import logging
import os
import warnings

import pytest
from PIL import Image

import make_report
from common import UserError

WORLD_PHRASES = ("held-out", "object f1", "exact set", "pointing game", "colour-shape", "shape word")
CAPTIONS = dict(bike="a man riding a bike down a street.", girl="a girl holding an umbrella in the rain",
                sheep="two sheep standing in a field", ski="a person on skis going down a snowy hill",
                umbrella="a woman with a red umbrella")


def tokens(caption: str, content: float, function: float) -> list:
    """attention.json's per-token records of p3_visualize, with made-up concentrations per kind of word."""
    records = []
    for word in caption.replace(".", " .").split():
        share = 0.15 if word == "." else function if word in make_report.FUNCTION_WORDS else content
        records.append(dict(label=word, word=word, top10_share=share, entropy=1 - share))
    return records + [dict(label="<|endoftext|>", word=None, top10_share=0.11, entropy=0.97)]


def draw(path, size=(120, 60)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (90, 140, 200)).save(path)


def course_results(folder, content=0.6, function=0.2) -> dict:
    """A results folder as run_all.py writes it on the course's data: figures, attention files, results.json."""
    for name in ("p1/pred.top5.png", "p2/loss_curves.png"):
        draw(os.path.join(folder, name))
    test = []
    for stem, caption in CAPTIONS.items():
        draw(os.path.join(folder, "p3", stem + ".png"), (300, 120))
        test.append(dict(image=stem + ".jpg", caption=caption, figure=stem + ".png", score=None,
                         tokens=tokens(caption, content, function)))
    pair = []
    for image, caption, score in (("000000001.jpg", "a plate of food on a table", 0.93),
                                  ("000000002.jpg", "a blurry photo of a thing", 0.41)):
        draw(os.path.join(folder, "p3", "best_worst", image.replace(".jpg", ".png")), (300, 120))
        pair.append(dict(image=image, caption=caption, figure=image.replace(".jpg", ".png"), score=score,
                         tokens=tokens(caption, content, function)))
    for name, figures in (("p3/attention.json", test), ("p3/best_worst/attention.json", pair)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(dict(figures=figures, layer="last", heads="mean"), f)
    training = dict(lr=5e-4, epochs=10, batch_size=32)
    results = dict(
        source=dict(data="/home/學生/hw3_data", command="python3 run_all.py --data hw3_data --out outputs/hw3",
                    device="cuda", gpu="NVIDIA GeForce RTX 2080 Ti",
                    versions=dict(python="3.8.18", torch="1.12.1", timm="0.9.10", open_clip=None),
                    git_commit="abc123def"),  # no "date": rendered as unknown
        p1_accuracy=0.812, p1_single_prompt_accuracy=0.79, p1_model="EVA02-L-14 / merged2b_s4b_b131k",
        p1_prompts=[dict(templates="This is a photo of {}", accuracy=0.78),
                    dict(templates="This is not a photo of {}", accuracy=0.74),
                    dict(templates="No {}, no score.", accuracy=0.70),
                    dict(templates="ensemble (18 templates)", accuracy=0.812)],
        files=dict(p1_top5="p1/pred.top5.png", p2_loss_curves="p2/loss_curves.png", p3_index="p3/index.md",
                   p3_best_worst="p3/best_worst/attention.json"),
        p2=dict(adapter=dict(cider=0.93, clipscore=0.72, trainable_params=9_800_000, checkpoint="p2/adapter.pt",
                             peft=dict(adapter_dim=64, adapter_places=["cross", "mlp"]), training=training),
                prefix=dict(cider=0.85, clipscore=0.70, trainable_params=12_000_000, checkpoint="p2/prefix.pt",
                            peft=dict(prefix_len=10, prefix_hidden=512), training=training),
                lora=dict(cider=0.90, clipscore=0.71, trainable_params=11_000_000, checkpoint="p2/lora.pt",
                          peft=dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets=["attn.c_attn"]),
                          training=training)),
        p2_best="adapter",
        p2_decoding=[dict(method="beam", beam_size=3, max_len=30, length_penalty=1.0, no_repeat_ngram=3, cider=0.92,
                          clipscore=0.72),
                     dict(method="greedy", beam_size=1, max_len=30, length_penalty=1.0, no_repeat_ngram=3, cider=0.93,
                          clipscore=0.72)],
        p2_inference=dict(method="greedy", beam_size=1, max_len=30, length_penalty=1.0, no_repeat_ngram=3, min_len=1,
                          chosen_on="highest CIDEr on p2_data/val.json (1789 images) among 2 settings (run_all.py)"),
        p3_best_worst=[dict(image=e["image"], caption=e["caption"], clipscore=e["score"]) for e in pair],
        command="python3 run_all.py --data hw3_data --out outputs/hw3")
    write_results(folder, results)
    return results


def write_results(folder, results: dict):
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False)


def render(folder, tmp_path, caplog, **kwargs) -> list:
    """Builds the PDF and its text, failing on any warning (a missing glyph, for one); returns the text lines."""
    text = tmp_path / "report.txt"
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        make_report.build(str(folder), str(tmp_path / "report.pdf"), text_out=str(text), **kwargs)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert (tmp_path / "report.pdf").read_bytes()[:5] == b"%PDF-"
    return text.read_text(encoding="utf-8").splitlines()


def flat(lines: list) -> str:
    """The lines as running text (a paragraph's wrapped lines joined again)."""
    return " ".join(line.strip() for line in lines)


def section(lines: list, start: str, end: str) -> str:
    return flat(lines[lines.index(start) + 1:lines.index(end)])


def test_course_layout_report_answers_each_question_and_says_nothing_of_the_world(tmp_path, caplog):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    lines = render(folder, tmp_path, caplog, student_id="r12345678")
    text = flat(lines)
    for phrase in WORLD_PHRASES:
        assert phrase not in text.lower(), phrase
    for question in make_report.QUESTIONS.values():
        assert question in lines, question
    assert "Student ID: r12345678" in lines[:3]

    source = section(lines, "Source of every number and figure", "Problem 1: zero-shot image classification with CLIP")
    assert "data: /home/\\u5b78\\u751f/hw3_data" in source  # no CJK glyph in DejaVu Sans: escaped, readable
    for expected in ("command: python3 run_all.py --data hw3_data --out outputs/hw3", "date: unknown",
                     "device: cuda, GPU: NVIDIA GeForce RTX 2080 Ti",
                     "versions: python 3.8.18, torch 1.12.1, timm 0.9.10, open_clip not installed",
                     "git commit: abc123def"):
        assert expected in source, expected

    best = section(lines, make_report.QUESTIONS["p2_best"], make_report.QUESTIONS["p2_attempts"])
    assert "adapter: CIDEr 0.9300, CLIPScore 0.7200" in best
    assert "adapter_dim=64, adapter_places=[cross, mlp]" in best
    assert "learning rate 0.0005, epochs 10, batch size 32" in best
    assert "method=greedy, max_len=30, no_repeat_ngram=3, min_len=1" in best
    assert "chosen by highest CIDEr on p2_data/val.json" in best
    for inactive in ("lora_", "prefix_", "beam_size", "length_penalty", "n_embd"):  # another method's, greedy's
        assert inactive not in best, inactive
    attempts = section(lines, make_report.QUESTIONS["p2_attempts"], make_report.QUESTIONS["p3_test"])
    assert "method | CIDEr | CLIPScore | trainable params" in attempts
    assert "lora: lora_rank=8, lora_alpha=16, lora_dropout=0.05, lora_targets=[attn.c_attn]" in attempts

    pair = section(lines, make_report.QUESTIONS["p3_best_worst"], make_report.QUESTIONS["p3_analysis"])
    assert "CLIPScore 0.9300" in pair and "CLIPScore 0.4100" in pair
    analysis = lines[lines.index(make_report.QUESTIONS["p3_analysis"]):]
    rows = [line.split(" | ")[0] for line in analysis if " | " in line]
    analysis = flat(analysis)
    assert rows == ["tokens of", "content words", "function words", "punctuation", "end token"]
    assert "content words are more concentrated than function words by both measures" in analysis
    assert "judgement for a person" in analysis
    assert analysis.count("[blank room for the student]") == len(CAPTIONS) + 2


def test_the_paragraph_follows_the_numbers(tmp_path, caplog):
    """The same report with function words' maps the peaked ones says so, and names another most peaked token."""
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder), content=0.2, function=0.7)
    text = flat(render(folder, tmp_path, caplog))
    assert "content words are less concentrated than function words by both measures" in text
    assert "The most concentrated token is 'a' in bike.jpg (share 0.700" in text


def test_world_report_keeps_the_worlds_measures(tmp_path, caplog):
    folder = tmp_path / "results"
    folder.mkdir()
    results = course_results(str(folder))
    world = copy.deepcopy(results)
    world.update(source="miniature world, seed 0 (tiny models)", p1_heldout_accuracy=0.955,
                 p1_heldout_accuracy_all_classes=0.725, pointing_game=0.831, pointing_trials=479)
    for row in world["p2"].values():
        row.update(object_f1=0.9, exact_object_set=0.8)
        del row["training"]  # the demo scores checkpoints trained elsewhere
    write_results(str(folder), world)
    for name in ("p3/attention.json", "p3/best_worst/attention.json"):  # an older p3_visualize: no token measures
        path = folder / name
        figures = json.loads(path.read_text())["figures"]
        path.write_text(json.dumps(dict(figures=[{k: v for k, v in e.items() if k != "tokens"} for e in figures])))
    lines = render(folder, tmp_path, caplog)
    text = flat(lines)
    for phrase in WORLD_PHRASES:
        assert phrase in text.lower(), phrase
    assert "0.9550 among the held-out classes, 0.7250 among all classes" in text
    assert "in 0.831 of 479 cases" in text
    assert "method | CIDEr | CLIPScore | object F1 | exact set | trainable params" in lines
    assert "source: miniature world, seed 0 (tiny models)" in lines
    assert "command: python3 run_all.py --data hw3_data --out outputs/hw3" in lines
    assert "Training: training settings not recorded in results.json." in lines
    assert "no per-token measures" in text
    for question in make_report.QUESTIONS.values():
        assert question in lines, question


def test_student_id_names_the_file_and_is_checked(tmp_path, monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    monkeypatch.chdir(str(tmp_path))
    assert make_report.main(["--results", str(folder), "--student-id", "r12345678"]) == 0
    assert (tmp_path / "hw3_r12345678.pdf").read_bytes()[:5] == b"%PDF-"
    for bad in ("r1234/../x", "r 1", "", "學號"):
        with pytest.raises(UserError, match="--student-id"):
            make_report.main(["--results", str(folder), "--student-id", bad])
        with pytest.raises(UserError, match="--student-id"):
            make_report.build(str(folder), str(tmp_path / "x.pdf"), student_id=bad)
    assert not (tmp_path / "x.pdf").exists()
