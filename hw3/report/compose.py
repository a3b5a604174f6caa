"""Builds the homework's report from a results folder (run_all.py's, or the demo's): each report question of the
homework, numbered as the homework numbers it, answered from that folder's own numbers and figures.

A measure the results do not hold is not mentioned (the miniature world's held-out classes, object F1 and pointing
game appear only in the demo's report); a judgement only a person can make ("is the caption reasonable?") is said
to be one and asked in the results folder's answers.md, whose answers the report shows in their place.

Writes the PDF and report.md beside it (the same document: Markdown for GitHub, pandoc or an editor).

    python3 make_report.py --results outputs/hw3 --student-id r12345678     # writes hw3_r12345678.pdf, report.md
    python3 make_report.py --results outputs/demo --out report.pdf
    python3 make_report.py --results outputs/hw3 --check                    # the questions still unanswered
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Dict, List, Optional

from hw3.report import answer_file
from hw3.report.layout import Report, say_undrawable
from hw3.report.p1_section import p1_section
from hw3.report.p2_section import p2_section
from hw3.report.p3_section import attention_entries, p3_questions, p3_section
from hw3.report.results_folder import copy_results, read_results
from hw3.report.toolkit_sections import attention_section, compare_section, data_section, distill_section, scst_section
from hw3.report.wording import UNKNOWN, shown_command, shown_path
from hw3.util.errors import UserError, run_main
from hw3.util.files import atomic_write, check_output_file

STUDENT_ID = re.compile(r"[A-Za-z0-9]+\Z")
MARKDOWN_NAME = "report.md"  # beside the PDF: the report's editable source


def source_lines(results: dict) -> List[str]:
    """The source block: a dict written by run_all.py (missing keys: unknown), or an older results file's string."""
    source = results.get("source")
    if not isinstance(source, dict):
        return ["source: %s" % (source or UNKNOWN), "command: %s" % results.get("command", UNKNOWN)]
    versions = source.get("versions") if isinstance(source.get("versions"), dict) else {}
    gpu = source.get("gpu", UNKNOWN)
    lines = ["data: %s" % shown_path(source.get("data", UNKNOWN)),
             "command: %s" % shown_command(source.get("command", UNKNOWN)),
             "date: %s" % source.get("date", UNKNOWN),
             "device: %s, GPU: %s" % (source.get("device", UNKNOWN), "none" if gpu is None else gpu),
             "versions: " + ", ".join("%s %s" % (name, "not installed" if versions.get(name, UNKNOWN) is None
                                                 else versions.get(name, UNKNOWN))
                                      for name in ("python", "torch", "timm", "open_clip")),
             "git commit: %s" % (source.get("git_commit") or UNKNOWN)]
    if source.get("note"):
        lines.append("note: %s" % source["note"])
    return lines


def title_page(report: Report, results: dict, results_dir: str, student_id: Optional[str],
               report_dir: Optional[str] = None):
    report.heading("Captioning report (run_all.py --captions)" if toolkit_run(results) else "DLCV HW3 report", 1)
    if student_id:
        report.paragraph("Student ID: %s" % student_id)
    report.heading("Source of every number and figure", 3)
    for line in source_lines(results):
        report.paragraph(line, bullet=True)
    report.paragraph("Results folder: %s (results.json and the figures beside it)." % folder_name(results_dir,
                                                                                               report_dir))


def folder_name(results_dir: str, report_dir: Optional[str]) -> str:
    """The results folder as the report names it: from the report's own folder, so the report names no path of the
    machine it was written on and stays true when the folders move together."""
    if report_dir is None:
        return os.path.basename(os.path.abspath(results_dir)) if os.path.isabs(results_dir) else results_dir
    relative = os.path.relpath(os.path.abspath(results_dir), os.path.abspath(report_dir))
    return "this report's folder" if relative == os.curdir else relative


def check_student_id(student_id: Optional[str]) -> Optional[str]:
    if student_id is not None and not STUDENT_ID.match(student_id):
        raise UserError("--student-id %r: letters and digits only, as in r12345678" % student_id)
    return student_id


def toolkit_run(results: dict) -> bool:
    """A run_all.py --captions run on another dataset: the homework's P1 and P3 are left out unless they ran."""
    source = results.get("source") if isinstance(results.get("source"), dict) else {}
    return isinstance(results.get("data"), dict) or "--captions" in str(source.get("command") or results.get("command"))


def questions(results_dir: str) -> List[answer_file.Question]:
    """The questions only a person can answer, for this results folder (one per P3 caption)."""
    test, pair = attention_entries(results_dir, read_results(results_dir).get("files", {}))[:2]
    return p3_questions(test + pair)


def compose(results_dir: str, student_id: Optional[str] = None, answers: Optional[Dict[str, str]] = None,
            report_dir: Optional[str] = None) -> Report:
    """The report's blocks, not yet written; `answers` (default: answers.md's) fill the questions; `report_dir`, the
    folder the report is written to (the results folder is named from there)."""
    check_student_id(student_id)
    results = read_results(results_dir)
    answers = answer_file.read(results_dir) if answers is None else answers
    toolkit = toolkit_run(results)
    report = Report()
    title_page(report, results, results_dir, student_id, report_dir)
    if isinstance(results.get("data"), dict):
        data_section(report, results["data"])
    sections = [(not toolkit or has_p1(results), lambda: p1_section(report, results, results_dir)),
                (not toolkit or bool(results.get("p2")), lambda: p2_section(report, results, results_dir)),
                (not toolkit or any(attention_entries(results_dir, results.get("files", {}))[:2]),
                 lambda: p3_section(report, results, results_dir, answers)),
                (bool(results.get("distill")), lambda: distill_section(report, results)),
                (bool(results.get("compare")), lambda: compare_section(report, results)),  # --with compare
                (isinstance(results.get("attention"), dict), lambda: attention_section(report, results, results_dir)),
                (bool(results.get("scst")), lambda: scst_section(report, results))]  # --with scst
    for wanted, section in sections:
        if wanted:
            report.new_page()
            section()
    return report


def has_p1(results: dict) -> bool:
    return any(results.get(k) is not None for k in ("p1_prompts", "p1_accuracy", "p1_model"))


def build(results_dir: str, out: str, student_id: Optional[str] = None, text_out: Optional[str] = None) -> str:
    """Writes the PDF to `out`, report.md beside it, answers.md into the results folder if absent (never over it),
    and the report's text, a line per item, to `text_out`; returns `out`."""
    check_student_id(student_id)
    answers = answer_file.ensure(results_dir, questions(results_dir))
    report = compose(results_dir, student_id, answers, os.path.dirname(os.path.abspath(out)))
    markdown_path = os.path.join(os.path.dirname(os.path.abspath(out)), MARKDOWN_NAME)
    markdown = report.markdown(os.path.dirname(markdown_path))
    say_undrawable(report.save(out))
    with atomic_write(markdown_path) as f:
        f.write(markdown)
    if text_out:
        with atomic_write(text_out) as f:
            f.write("\n".join(report.lines) + "\n")
    return out


def check(results_dir: str) -> int:
    """--check: the questions still unanswered in answers.md, one a line; 1 while any remain."""
    asked = questions(results_dir)
    left = answer_file.unanswered(results_dir, asked)
    path = os.path.join(results_dir, answer_file.ANSWERS_FILE)
    if not left:
        print("all %d question(s) answered in %s" % (len(asked), path))
        return 0
    print("%d of %d question(s) unanswered in %s:" % (len(left), len(asked), path))
    for question in left:
        print("  [%s] %s" % (question.qid, question.text))
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join("outputs", "demo"), help="results folder (results.json ...)")
    parser.add_argument("--student-id", help="your student ID (letters and digits): on the title page, and the PDF "
                        "is named hw3_<ID>.pdf as the course asks unless --out is given")
    parser.add_argument("--out", help="the PDF to write (default: hw3_<ID>.pdf with --student-id, else report.pdf)")
    parser.add_argument("--text", metavar="FILE", help="also write the report's text, one item a line")
    parser.add_argument("--check", action="store_true", help="only list the questions not yet answered in the "
                        "results folder's %s; exit status 1 while any remain" % answer_file.ANSWERS_FILE)
    parser.add_argument("--copy-to", metavar="DIR",
                        help="first copy the files the report reads into DIR (e.g. results/miniworld, to commit) "
                             "and build from there")
    args = parser.parse_args(argv)
    check_student_id(args.student_id)
    if args.check:
        return check(args.results)
    out = args.out or ("hw3_%s.pdf" % args.student_id if args.student_id else "report.pdf")
    check_output_file(out, "report")
    if args.text:
        check_output_file(args.text, "report text")
    results = copy_results(args.results, args.copy_to) if args.copy_to else args.results
    print("wrote %s" % build(results, out, args.student_id, args.text))
    return 0


if __name__ == "__main__":
    run_main(main)
