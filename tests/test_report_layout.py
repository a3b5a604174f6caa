"""report_layout.py: what the report draws is what its lines say, and every character can be drawn."""
from __future__ import annotations

from report_layout import Report


def test_characters_the_font_lacks_are_escaped(tmp_path):
    report = Report()
    try:
        report.paragraph("資料 café $5 and $6 𠀀")  # '$...$' would be mathtext
    finally:
        report.save(str(tmp_path / "page.pdf"))
    assert report.lines[-1] == "\\u8cc7\\u6599 café $5 and $6 \\U00020000"
    assert [t.get_text() for t in report.pages[0].texts] == ["\\u8cc7\\u6599 café \\$5 and \\$6 \\U00020000"]


def test_lines_follow_what_is_drawn_and_pages_break(tmp_path):
    report = Report()
    try:
        report.heading("Title")
        report.table(["a", "b"], [["1", "2"], ["3", "4"]])
        report.blank("Your answer:")
        assert len(report.pages) == 1
        report.keep(2.0)  # more than a page: starts the next one
        report.paragraph("word " * 300)
    finally:
        report.save(str(tmp_path / "page.pdf"))
    assert report.lines[:5] == ["Title", "a | b", "1 | 2", "3 | 4", "Your answer:"]
    assert report.lines[5] == "[blank room for the student]" and len(report.pages) == 2
    assert all(len(line) <= 100 for line in report.lines)
