"""The student's answers to the questions only a person can answer, kept in the results folder's answers.md: one
section per question, headed '## [ID] question', the numbers' hint as a '>' quote, then the answer in Markdown.

make_report.py creates the file with the questions and the hints when it is absent, appends a section for a new
question, and never changes what is written; every rerun of run_all.py or make_report.py reads the answers from it."""
from __future__ import annotations

import os
import re
from typing import Dict, List, NamedTuple, Sequence

from hw3.util.files import atomic_write

ANSWERS_FILE = "answers.md"
SECTION = re.compile(r"^## \[([^\]]+)\]", re.M)
PLACEHOLDER = "(your answer here)"
INTRO = """# Answers for the report

Write each answer below its question, in place of "%s" (Markdown, in any language,
Chinese included). The lines starting with '>' are what the numbers say, not part of the answer. make_report.py
puts each answer in its place in report.md and the PDF, and never overwrites this file;
`python3 make_report.py --results DIR --check` lists the questions still unanswered.
""" % PLACEHOLDER


class Question(NamedTuple):
    qid: str
    text: str
    hint: str


def section(question: Question) -> str:
    hint = "\n".join("> " + line for line in question.hint.splitlines()) if question.hint else ""
    return "## [%s] %s\n\n%s%s\n" % (question.qid, question.text, hint + "\n\n" if hint else "", PLACEHOLDER)


def parse(text: str) -> Dict[str, str]:
    """{question id: answer}, the answer without the hint quote or the placeholder ('' when unanswered)."""
    answers = {}
    starts = list(SECTION.finditer(text))
    for n, match in enumerate(starts):
        body = text[match.end():starts[n + 1].start() if n + 1 < len(starts) else len(text)]
        lines = body.split("\n")[1:]  # the rest of the heading line is the question's text
        kept = [line for line in lines if not line.startswith(">") and line.strip() != PLACEHOLDER]
        answers[match.group(1).strip()] = "\n".join(kept).strip()
    return answers


def read(folder: str) -> Dict[str, str]:
    path = os.path.join(folder, ANSWERS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return parse(f.read())


def ensure(folder: str, questions: Sequence[Question]) -> Dict[str, str]:
    """Creates answers.md with every question (or appends the sections of questions it lacks), keeping every byte
    already written; returns the answers."""
    path = os.path.join(folder, ANSWERS_FILE)
    old = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    present = parse(old)
    missing = [q for q in questions if q.qid not in present]
    if missing:
        text = (old.rstrip("\n") + "\n\n" if old else INTRO + "\n") + "\n".join(section(q) for q in missing)
        with atomic_write(path) as f:
            f.write(text)
    return read(folder)


def unanswered(folder: str, questions: Sequence[Question]) -> List[Question]:
    answers = read(folder)
    return [q for q in questions if not answers.get(q.qid)]
