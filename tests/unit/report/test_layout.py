"""hw3.report.layout: one document, two renderings. What the PDF says (pdftotext) and what report.md says are the
report's lines; figures resolve; a script without an installed font becomes one line naming the package."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from hw3.report import layout
from hw3.report.layout import NO_FONT_LINE, Report

CHINESE = "注意力落在十字上，caption 合理"


def pdf_text(path) -> str:
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext not installed (Debian: apt-get install poppler-utils; .ci/run installs it)")
    return subprocess.run(["pdftotext", "-enc", "UTF-8", str(path), "-"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, check=True).stdout.decode("utf-8")


def sample(tmp_path) -> Report:
    figure = tmp_path / "results" / "p3" / "a b.png"
    figure.parent.mkdir(parents=True)
    Image.new("RGB", (300, 120), (90, 140, 200)).save(str(figure))
    report = Report()
    report.heading("Title", 1)
    report.heading("Problem 1", 2)
    report.paragraph("café $5 and $6 <|endoftext|> a_b *c*")
    report.table(["a", "b|c"], [["1", "2"], ["3", "4"]])
    report.table(["empty"], [])
    report.image(str(figure), "p3/a b.png", caption="the figure")
    report.image(str(tmp_path / "results" / "gone.png"), "gone.png")
    report.heading("3. Analysis", 3)
    report.question("P3.3 x.png", "is it reasonable?", "hint 0.9", "", "answers.md")
    report.question("P3.3 y.png", "is it reasonable?", "", "Yes, it is.", "answers.md")
    return report


def test_lines_say_what_each_block_says(tmp_path):
    assert sample(tmp_path).lines == [
        "Title", "Problem 1", "café $5 and $6 <|endoftext|> a_b *c*", "a | b|c", "1 | 2", "3 | 4", "the figure",
        "(figure missing: gone.png)", "3. Analysis", "[P3.3 x.png] is it reasonable?", "hint 0.9",
        "[unanswered: write it in answers.md under [P3.3 x.png]]", "[P3.3 y.png] is it reasonable?", "Yes, it is."]


def test_markdown_has_headings_tables_and_links_that_resolve(tmp_path):
    markdown = sample(tmp_path).markdown(str(tmp_path))
    assert markdown.startswith("# Title\n\n## Problem 1\n\n")
    assert "café \\$5 and \\$6 \\<\\|endoftext\\|\\> a\\_b \\*c\\*" in markdown  # literal on GitHub and in pandoc
    assert "| a | b\\|c |\n| --- | --- |\n| 1 | 2 |" in markdown and "empty" not in markdown
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert links == ["results/p3/a%20b.png"]
    assert all(os.path.isfile(os.path.join(str(tmp_path), link.replace("%20", " "))) for link in links)
    assert "### 3. Analysis" in markdown and "Yes, it is." in markdown
    assert "> **\\[unanswered: write it in answers.md under \\[P3.3 x.png\\]\\]**" in markdown


def test_pdf_text_is_selectable_with_bookmarks(tmp_path):
    report = sample(tmp_path)
    assert report.save(str(tmp_path / "r.pdf")) == []
    data = (tmp_path / "r.pdf").read_bytes()
    assert data[:5] == b"%PDF-" and b"/Outlines" in data
    text = " ".join(pdf_text(tmp_path / "r.pdf").split())
    for expected in ("Problem 1", "café $5 and $6 <|endoftext|> a_b *c*", "b|c", "Yes, it is.",
                     "[unanswered: write it in answers.md under [P3.3 x.png]]", "(figure missing: gone.png)"):
        assert expected in text, expected


def test_chinese_is_typeset_with_a_cjk_font(tmp_path):
    if not layout.cjk_font():
        pytest.skip("no CJK font (Debian: apt-get install %s; .ci/run installs it)" % layout.CJK_PACKAGE)
    report = Report()
    report.paragraph(CHINESE)
    report.table(["答案"], [["是"]])
    assert report.save(str(tmp_path / "zh.pdf")) == []
    text = pdf_text(tmp_path / "zh.pdf")
    assert CHINESE in text and "答案" in text and NO_FONT_LINE not in text


def test_without_a_cjk_font_one_line_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(layout, "cjk_font", lambda: None)
    report = Report()
    report.paragraph("Latin stays.")
    report.paragraph(CHINESE)
    undrawable = report.save(str(tmp_path / "zh.pdf"))
    assert undrawable == [CHINESE]
    layout.say_undrawable(undrawable)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and layout.CJK_PACKAGE in err[0]
    text = " ".join(pdf_text(tmp_path / "zh.pdf").split())
    assert "Latin stays." in text and NO_FONT_LINE in text and "\\u" not in text


def test_matplotlib_titles_escape_what_the_font_lacks():
    """p3_visualize's figure titles: DejaVu Sans has no CJK, so it is escaped; '$' is not mathtext."""
    assert layout.readable("資料 café 𠀀") == "\\u8cc7\\u6599 café \\U00020000"
    assert layout.drawable("$5") == "\\$5"
