"""make_report.py on a results folder of the course's layout (no miniature-world fields) and on one with them: the
report answers every question of the homework, says only what the results hold, lists only the active settings and
draws every character it is given, without warnings; the student's answers are kept and placed; report.md is the
same report; a toolkit run's report describes that run."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import warnings

import pytest
from PIL import Image

from hw3.report import answer_file, compose, layout, p1_section, p3_section, published, results_folder
from hw3.report.questions import QUESTIONS
from hw3.util.errors import UserError
from hw3 import REPO_ROOT as ROOT


WORLD_PHRASES = ("held-out", "object f1", "exact set", "pointing game", "colour-shape", "shape word")
CAPTIONS = dict(bike="a man riding a bike down a street.", girl="a girl holding an umbrella in the rain",
                sheep="two sheep standing in a field", ski="a person on skis going down a snowy hill",
                umbrella="a woman with a red umbrella")


def tokens(caption: str, content: float, function: float) -> list:
    """attention.json's per-token records of p3_visualize, with made-up concentrations per kind of word."""
    records = []
    for word in caption.replace(".", " .").split():
        share = 0.15 if word == "." else function if word in p3_section.FUNCTION_WORDS else content
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
        compose.build(str(folder), str(tmp_path / "report.pdf"), text_out=str(text), **kwargs)
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
    for question in QUESTIONS.values():
        assert question in lines, question
    assert "Student ID: r12345678" in lines[:3]

    source = section(lines, "Source of every number and figure", "Problem 1: zero-shot image classification with CLIP")
    assert "data: .../hw3_data" in source and "/home" not in text  # an absolute path: its last part only
    for expected in ("command: python3 run_all.py --data hw3_data --out outputs/hw3", "date: unknown",
                     "device: cuda, GPU: NVIDIA GeForce RTX 2080 Ti",
                     "versions: python 3.8.18, torch 1.12.1, timm 0.9.10, open_clip not installed",
                     "git commit: abc123def"):
        assert expected in source, expected

    best = section(lines, QUESTIONS["p2_best"], QUESTIONS["p2_attempts"])
    assert "adapter: CIDEr 0.9300, CLIPScore 0.7200" in best
    assert "adapter_dim=64, adapter_places=[cross, mlp]" in best
    assert "learning rate 0.0005, epochs 10, batch size 32" in best
    assert "method=greedy, max_len=30, no_repeat_ngram=3, min_len=1" in best
    assert "chosen by highest CIDEr on p2_data/val.json" in best
    for inactive in ("lora_", "prefix_", "beam_size", "length_penalty", "n_embd"):  # another method's, greedy's
        assert inactive not in best, inactive
    attempts = section(lines, QUESTIONS["p2_attempts"], QUESTIONS["p3_test"])
    assert "method | CIDEr | CLIPScore | trainable params" in attempts
    assert "lora: lora_rank=8, lora_alpha=16, lora_dropout=0.05, lora_targets=[attn.c_attn]" in attempts

    pair = section(lines, QUESTIONS["p3_best_worst"], QUESTIONS["p3_analysis"])
    assert "CLIPScore 0.9300" in pair and "CLIPScore 0.4100" in pair
    analysis = lines[lines.index(QUESTIONS["p3_analysis"]):]
    rows = [line.split(" | ")[0] for line in analysis if " | " in line]
    analysis = flat(analysis)
    assert rows == ["tokens of", "content words", "function words", "punctuation", "end token"]
    assert "content words are more concentrated than function words by both measures" in analysis
    assert "judgement for a person" in analysis
    assert analysis.count("[unanswered: write it in answers.md under [P3.3 ") == len(CAPTIONS) + 2


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
    for question in QUESTIONS.values():
        assert question in lines, question


def test_student_id_names_the_file_and_is_checked(tmp_path, monkeypatch):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    monkeypatch.chdir(str(tmp_path))
    assert compose.main(["--results", str(folder), "--student-id", "r12345678"]) == 0
    assert (tmp_path / "hw3_r12345678.pdf").read_bytes()[:5] == b"%PDF-"
    for bad in ("r1234/../x", "r 1", "", "學號"):
        with pytest.raises(UserError, match="--student-id"):
            compose.main(["--results", str(folder), "--student-id", bad])
        with pytest.raises(UserError, match="--student-id"):
            compose.build(str(folder), str(tmp_path / "x.pdf"), student_id=bad)
    assert not (tmp_path / "x.pdf").exists()


# ----------------------------------------------------------------------------------------------- answers

def answer(folder, qid: str, text: str):
    """Writes `text` in place of the placeholder of question `qid` in answers.md, as a student edits it."""
    path = os.path.join(str(folder), answer_file.ANSWERS_FILE)
    content = open(path, encoding="utf-8").read()
    at = content.index(answer_file.PLACEHOLDER, content.index("## [%s]" % qid))
    with open(path, "w", encoding="utf-8") as f:
        f.write(content[:at] + text + content[at + len(answer_file.PLACEHOLDER):])


def pdf_text(path) -> str:
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext not installed (Debian: apt-get install poppler-utils; .ci/run installs it)")
    return subprocess.run(["pdftotext", "-enc", "UTF-8", str(path), "-"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, check=True).stdout.decode("utf-8")


def test_answers_are_asked_kept_and_placed(tmp_path, caplog, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    render(folder, tmp_path, caplog)
    path = folder / answer_file.ANSWERS_FILE
    questions = compose.questions(str(folder))
    assert len(questions) == len(CAPTIONS) + 2
    text = path.read_text(encoding="utf-8")
    for question in questions:
        assert "## [%s] %s" % (question.qid, question.text) in text
    assert "> Most concentrated content tokens (top-10% share): 'man' 0.60, 'riding' 0.60, 'bike' 0.60." in text  # what the numbers say
    assert compose.main(["--results", str(folder), "--check"]) == 1
    out = capsys.readouterr().out
    assert "%d of %d question(s) unanswered" % (len(questions), len(questions)) in out and "[P3.3 bike.jpg]" in out

    english, chinese = "The caption is right; 'bike' looks at the bike.", "字幕合理，注意力落在腳踏車上。"
    answer(folder, "P3.3 bike.jpg", english)
    answer(folder, "P3.3 sheep.jpg", chinese)
    edited = path.read_bytes()
    lines = render(folder, tmp_path, caplog)  # a rebuild reads the answers and leaves the file alone
    assert path.read_bytes() == edited
    assert english in lines and chinese in lines
    assert lines[lines.index(english) - 2] == "[P3.3 bike.jpg] \"%s\": is the caption reasonable, and does each " \
        "attended region reflect its word?" % CAPTIONS["bike"]
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert english in markdown and chinese in markdown
    assert compose.main(["--results", str(folder), "--check"]) == 1
    out = capsys.readouterr().out
    assert "%d of %d" % (len(questions) - 2, len(questions)) in out and "bike.jpg" not in out
    for question in questions:
        if question.qid not in ("P3.3 bike.jpg", "P3.3 sheep.jpg"):
            answer(folder, question.qid, "Fine.")
    assert compose.main(["--results", str(folder), "--check"]) == 0


def test_a_new_question_is_appended_and_nothing_written_changes(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    first = compose.questions(str(folder))
    answer_file.ensure(str(folder), first[:2])
    answer(folder, first[0].qid, "Kept.")
    before = (folder / answer_file.ANSWERS_FILE).read_text(encoding="utf-8")
    answers = answer_file.ensure(str(folder), first)
    after = (folder / answer_file.ANSWERS_FILE).read_text(encoding="utf-8")
    assert after.startswith(before) and answers[first[0].qid] == "Kept."
    assert set(answers) == {q.qid for q in first} and not any(answers[q.qid] for q in first[1:])


def test_a_chinese_answer_is_text_in_the_pdf_or_one_line_without_a_font(tmp_path, caplog, monkeypatch, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    compose.build(str(folder), str(tmp_path / "first.pdf"))
    chinese = "注意力集中在傘上，這個描述合理。"
    answer(folder, "P3.3 umbrella.jpg", chinese)
    if layout.cjk_font():
        render(folder, tmp_path, caplog)
        assert chinese in pdf_text(tmp_path / "report.pdf")
    monkeypatch.setattr(layout, "cjk_font", lambda: None)
    capsys.readouterr()
    compose.build(str(folder), str(tmp_path / "nofont.pdf"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fonts-noto-cjk" in err[0]
    text = " ".join(pdf_text(tmp_path / "nofont.pdf").split())
    assert layout.NO_FONT_LINE in text and chinese not in text and "\\u" not in text
    assert chinese in (tmp_path / "report.md").read_text(encoding="utf-8")  # the source keeps it as written


def test_report_md_figure_links_resolve(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    (tmp_path / "elsewhere").mkdir()
    compose.build(str(folder), str(tmp_path / "elsewhere" / "hw3_r1.pdf"))
    markdown = (tmp_path / "elsewhere" / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(links) == 2 + len(CAPTIONS) + 2  # top-5, loss curves, the P3 figures
    for link in links:
        assert not os.path.isabs(link) and os.path.isfile(str(tmp_path / "elsewhere" / link)), link
    for question in QUESTIONS.values():
        assert "### " + question.replace(".", "\\.", 0) in markdown
    assert "| method | CIDEr | CLIPScore | trainable params |" in markdown


def test_copy_keeps_the_answers(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    course_results(str(folder))
    compose.build(str(folder), str(tmp_path / "r.pdf"))
    answer(folder, "P3.3 bike.jpg", "Copied along.")
    results_folder.copy_results(str(folder), str(tmp_path / "copy"))
    assert answer_file.read(str(tmp_path / "copy"))["P3.3 bike.jpg"] == "Copied along."


# ----------------------------------------------------------------------------------------------- prompt analysis

def prompts(gained: int, lost: int, n: int = 500) -> list:
    """The report's three templates and the ensemble; each compared one differs by gained - lost images."""
    base = 0.8
    rows = [dict(templates="This is a photo of {}", accuracy=base)]
    for text in ("This is not a photo of {}", "No {}, no score."):
        rows.append(dict(templates=text, accuracy=base + (gained - lost) / n, paired=dict(n=n, gained=gained,
                                                                                          lost=lost)))
    rows.append(dict(templates="ensemble (18 templates)", accuracy=base + 2 * (gained - lost) / n,
                     paired=dict(n=n, gained=gained, lost=lost)))
    return rows


def test_a_cause_only_beyond_sampling_noise():
    within = p1_section.prompt_analysis(prompts(gained=6, lost=4))
    assert within.count("indistinguishable on this data") == 3
    assert "reads 'not a photo of X'" not in within and "cancels the quirks" not in within
    beyond = p1_section.prompt_analysis(prompts(gained=2, lost=12))
    assert "indistinguishable" not in beyond and "pulls every class embedding" in beyond
    assert "reads 'not a photo of X' mostly as 'X'" in beyond  # -2 points, beyond the noise
    assert "exact McNemar over the 500 images" in beyond
    unpaired = p1_section.prompt_analysis([{k: v for k, v in p.items() if k != "paired"} for p in prompts(2, 12)])
    assert "no cause is given" in unpaired and "pulls every" not in unpaired and "reads 'not" not in unpaired


def test_the_interval_is_the_exact_binomial_one():
    stats = pytest.importorskip("scipy.stats", reason="scipy (the course lane has it) is the reference")
    for k, m in ((0, 7), (3, 10), (12, 40), (40, 40), (150, 400)):
        lower, upper = p1_section.clopper_pearson(k, m)
        expected_lower = 0.0 if k == 0 else stats.beta.ppf(0.025, k, m - k + 1)
        expected_upper = 1.0 if k == m else stats.beta.ppf(0.975, k + 1, m - k)
        assert lower == pytest.approx(expected_lower, abs=1e-9) and upper == pytest.approx(expected_upper, abs=1e-9)
    diff, lower, upper = p1_section.paired_interval(dict(n=500, gained=30, lost=10))
    assert diff == pytest.approx(4.0) and lower < 4.0 < upper and lower > 0


# ----------------------------------------------------------------------------------------------- toolkit run

def test_a_toolkit_run_reports_that_run_only(tmp_path, caplog):
    """run_all.py --captions: no homework P1/P3 sections, no absolute path, no column or table nobody fills, the
    data and attention sections when results.json holds them, and cut captions said."""
    folder = tmp_path / "results"
    (folder / "attention").mkdir(parents=True)
    Image.new("RGB", (300, 120)).save(str(folder / "attention" / "0001.png"))
    results = dict(
        source=dict(data="/home/someone/fashion", command="python3 run_all.py --captions /home/someone/c.json "
                    "--images /home/someone/img --out outputs/fashion --with compare"),
        data={"format": "deepfashion", "splits": {"train": 200, "val": 50},
              "caption_tokens": {"min": 20, "median": 55, "p95": 90, "max": 120}, "cut": 0},
        compare=dict(gru={"CIDEr": 1.9, "BLEU-4": 0.5, "cut": 3}, transformer={"CIDEr": 2.1, "BLEU-4": 0.6, "cut": 0}),
        attention={"arch": "transformer", "figures": ["attention/0001.png"],
                   "best": {"image": "0001.jpg", "caption": "a shirt", "CIDEr": 3.1},
                   "worst": {"image": "0002.jpg", "caption": "a dress", "CIDEr": 0.1}},
        files={})
    write_results(str(folder), results)
    lines = render(folder, tmp_path, caplog)
    text = flat(lines)
    assert "Problem 1" not in text and "Problem 2" not in text and "p1 stage did not run" not in text
    assert lines[0] == "Captioning report (run_all.py --captions)" and "gpt2 is P2's best" not in text
    assert "/home/" not in text and "data: .../fashion" in text
    assert "Caption file format: deepfashion." in lines and "Split sizes: train 200, val 50." in lines
    assert "architecture | CIDEr | BLEU-4" in lines and "trained params" not in text and "train s" not in text
    assert "Captions cut at the length limit (no end token), so scored shorter than decoded: gru 3." in lines
    assert "Attention maps of transformer" in lines and "0001" in lines
    assert 'Best caption: "a shirt" (image 0001.jpg, CIDEr 3.1).' in lines
    assert "shared/seeds" not in text and not (folder / answer_file.ANSWERS_FILE).exists()
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "](results/attention/0001.png)" in markdown and "| --- |" in markdown


# ----------------------------------------------------------------------------------------------- today's report

# What the report says differently from the matplotlib report (tests/data/report_before.txt, written by the earlier
# make_report.py from results/miniworld/): (before, after) per intentional change; everything else must be equal.
NOISE = "exact McNemar over the 1000 images: within sampling noise, so the two are indistinguishable on this data"
CHANGED = (
    ("The negated prompt changes accuracy by +0.2 points against 'This is a photo of {}': CLIP's text encoder, "
     "trained on captions that rarely negate, reads 'not a photo of X' mostly as 'X'.",
     "The negated prompt changes accuracy by +0.2 points against 'This is a photo of {}' (95% interval -0.7 to "
     "+1.0 points, " + NOISE + ")."),
    ("costs accuracy (-0.4 points): its extra words carry meaning of their own that pulls every class embedding "
     "the same way.", "costs accuracy (-0.4 points; 95% interval -1.8 to +1.1 points, " + NOISE + ")."),
    ("(0.9230 vs 0.9210): averaging embeddings over templates cancels the quirks of any one wording.",
     "(0.9230 vs 0.9210; 95% interval -0.5 to +0.8 points, " + NOISE + ")."),
    ("training settings not recorded in results.json", "learning rate 0.005, epochs 5, batch size 32"),
    ("Room for it, per caption:", "Your answer, per caption, from answers.md in the results folder:"),
    ("Source: seed 004 (shared/seeds/004_db8a455a6fcc3b32.txt) sections",
     "Source: " + published.COURSE_PROJECT_REPORT + ", sections"),
    ("Source of the left half: seed 004 (another course's captioning project, DeepFashion-MultiModal),",
     "Source of the left half: " + published.COURSE_PROJECT_REPORT + ","),
    ("The seed's table beside it", "The published table beside it"),
    ("Beside the seed's DeepFashion table", "Beside the published DeepFashion table"),
    ("seed 004: model | CIDEr (DeepFashion)", "published model | CIDEr (DeepFashion)"),
    ("CIDEr as the seed reports it.", "CIDEr as published."),
)
# The source block's folders (now <DATA> and <OUT>), date and commit say where and when the demo ran, not what it found.
RUN_CIRCUMSTANCES = (r"data:.*?date:\d{4}-\d\d-\d\d\d\d:\d\dUTC", r"gitcommit:[0-9a-f]{40}(\(withuncommittedchanges\))?")


def circumstances_out(squeezed: str) -> str:
    for pattern in RUN_CIRCUMSTANCES:
        squeezed = re.sub(pattern, "", squeezed, count=1)
    return squeezed


def squeeze(text: str) -> str:
    """Text without whitespace: the old report wrapped its lines at 100 characters (and after hyphens)."""
    return re.sub(r"\s+", "", text)


def test_the_demo_report_says_what_it_said_where_that_was_right(tmp_path, monkeypatch):
    before = open(os.path.join(ROOT, "tests", "data", "report_before.txt"), encoding="utf-8").read()
    monkeypatch.chdir(str(tmp_path))
    folder = os.path.join("results", "miniworld")  # as the demo's report names it
    shutil.copytree(os.path.join(ROOT, "results", "miniworld"), folder,
                    ignore=shutil.ignore_patterns(answer_file.ANSWERS_FILE))
    compose.build(folder, str(tmp_path / "report.pdf"), text_out=str(tmp_path / "report.txt"))
    after = (tmp_path / "report.txt").read_text(encoding="utf-8")
    # the old report's blank boxes are the new one's questions, each with its hint and placeholder
    blanks = re.findall(r"^(\S+\.png): (\"[^\n]*(?:\n(?!\[blank)[^\n]*)*)\n\[blank room for the student\]\n", before,
                        re.M)
    assert len(blanks) == 7
    for image, _ in blanks:
        assert "[P3.3 %s]" % image in after and "under [P3.3 %s]]" % image in after
    before = re.sub(r"^\S+\.png: \"[^\n]*(?:\n(?!\[blank)[^\n]*)*\n\[blank room for the student\]\n", "", before,
                    flags=re.M)
    after = re.sub(r"^\[P3\.3 .*\n.*\n\[unanswered: .*\n", "", after, flags=re.M)
    expected = squeeze(before)
    for old, new in CHANGED:
        assert squeeze(old) in expected, old
        expected = expected.replace(squeeze(old), squeeze(new))
    assert circumstances_out(squeeze(after)) == circumstances_out(expected)
