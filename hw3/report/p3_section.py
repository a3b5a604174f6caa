"""P3 in the report: the attention figures, how concentrated each kind of word's maps are (measured without labels),
and one question per caption that only a person can answer."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from hw3.report import answer_file
from hw3.report.layout import Report
from hw3.report.questions import QUESTIONS
from hw3.report.wording import UNKNOWN, fmt
from hw3.util.files import read_json

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no another
of in on at by for with from to into onto over under above below near next beside behind between among through
across along around about against during before after up down out off than like as upon toward towards while
and or but nor so yet if because although though whether then
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs itself
themselves himself herself who whom whose which what there here
is are was were be been being am do does did has have had having will would shall should can could may might
must 's 're 't not
""".split())
CATEGORIES = ("content words", "function words", "punctuation", "end token")


def word_category(word: Optional[str]) -> str:
    if word is None:
        return "end token"
    word = word.strip().lower()
    if not any(c.isalnum() for c in word):
        return "punctuation"
    return "function words" if word in FUNCTION_WORDS else "content words"


def category_name(category: str) -> str:
    return "the end token" if category == "end token" else category


def category_table(entries: Sequence[dict]) -> List[Tuple[str, int, float, float]]:
    """(category, tokens, mean top-10% share, mean normalised entropy) over every token of the entries."""
    pooled: Dict[str, List[dict]] = {c: [] for c in CATEGORIES}
    for entry in entries:
        for token in entry.get("tokens") or []:
            pooled[word_category(token.get("word"))].append(token)
    return [(c, len(ts), sum(t["top10_share"] for t in ts) / len(ts), sum(t["entropy"] for t in ts) / len(ts))
            for c, ts in pooled.items() if ts]


def compare(name_a: str, a: Tuple, name_b: str, b: Tuple, tolerance: float = 0.01) -> str:
    """Which of two categories' attention is more concentrated, by both measures, or that they disagree."""
    share, entropy = a[2] - b[2], b[3] - a[3]  # positive: a more concentrated
    if abs(share) < tolerance and abs(entropy) < tolerance:
        return "%s and %s are about equally concentrated (differences below %g)" % (name_a, name_b, tolerance)
    if share > 0 and entropy > 0:
        return "%s are more concentrated than %s by both measures" % (name_a, name_b)
    if share < 0 and entropy < 0:
        return "%s are less concentrated than %s by both measures" % (name_a, name_b)
    return "the two measures disagree on whether %s are more concentrated than %s" % (name_a, name_b)


def concentration_paragraph(entries: Sequence[dict], table) -> str:
    rows = {row[0]: row for row in table}
    tokens = [(t, e["image"]) for e in entries for t in e.get("tokens") or []]
    parts = ["Over %d generated tokens of %d captions, the mean share of attention on the top 10%% of patches (a "
             "uniform map gives about 0.1, one patch 1) is %s; the mean normalised entropy (1 uniform, 0 one patch) is "
             "%s." % (len(tokens), len(entries), ", ".join("%.3f for %s" % (r[2], category_name(r[0])) for r in table),
                      ", ".join("%.3f for %s" % (r[3], category_name(r[0])) for r in table))]
    if "content words" in rows and "function words" in rows:
        parts.append("So %s." % compare("content words", rows["content words"], "function words",
                                        rows["function words"]))
    peak = max(tokens, key=lambda ti: ti[0]["top10_share"])
    flat = min(tokens, key=lambda ti: ti[0]["top10_share"])
    parts.append("The most concentrated token is '%s' in %s (share %.3f, entropy %.3f); the least, '%s' in %s "
                 "(share %.3f, entropy %.3f)." % (peak[0]["label"], peak[1], peak[0]["top10_share"],
                                                   peak[0]["entropy"], flat[0]["label"], flat[1],
                                                   flat[0]["top10_share"], flat[0]["entropy"]))
    parts.append("These measures say how peaked a map is, not whether its peak lies on the object the word names; "
                 "that needs a person looking at the figures above.")
    return " ".join(parts)


def attention_kind(layer: str, heads: str) -> str:
    """p3_visualize's --layer and --heads in words."""
    blocks = dict(last="the last decoder block with cross-attention", mean="the mean over the blocks with "
                  "cross-attention").get(layer, "decoder block %s" % layer)
    return "%s, %s" % (blocks, dict(mean="mean over heads", max="maximum over heads").get(heads, "head %s" % heads))


def attention_entries(folder: str, files: dict) -> Tuple[List[dict], List[dict], str, str, dict]:
    index = os.path.join(folder, files.get("p3_index", "p3/index.md"))
    test_json = os.path.join(os.path.dirname(index), "attention.json")
    pair_json = os.path.join(folder, files.get("p3_best_worst", "p3/best_worst/attention.json"))
    test = read_json(test_json, "P3 attention file") if os.path.isfile(test_json) else {}
    pair = read_json(pair_json, "P3 attention file") if os.path.isfile(pair_json) else {}
    return (test.get("figures") or [], pair.get("figures") or [], os.path.dirname(test_json),
            os.path.dirname(pair_json), test)


def p3_section(report: Report, results: dict, folder: str, answers: Dict[str, str]):
    report.heading("Problem 2: visualisation of attention in image captioning (P3)")
    test, pair, test_dir, pair_dir, meta = attention_entries(folder, results.get("files", {}))
    report.heading(QUESTIONS["p3_test"], 3)
    report.paragraph("Cross-attention of each generated token over the image patches (%s; the start-token panel "
                     "shows the image)." % attention_kind(meta.get("layer", "last"), meta.get("heads", "mean")))
    if not test:
        report.paragraph("The results hold no P3 figures (the p3 stage did not run).")
    for entry in test:
        report.image(os.path.join(test_dir, entry["figure"]), shown(folder, test_dir, entry["figure"]),
                     caption="%s: %s" % (entry["image"], entry["caption"]))
    report.heading(QUESTIONS["p3_best_worst"], 3)
    if not pair:
        report.paragraph("The results hold no top-1/last-1 figures (the p3 stage did not run).")
    for rank, entry in zip(("top-1", "last-1"), pair):
        report.image(os.path.join(pair_dir, entry["figure"]), shown(folder, pair_dir, entry["figure"]),
                     caption="%s: %s, CLIPScore %s: %s" % (rank, entry["image"], fmt(entry.get("score")),
                                                          entry["caption"]))
    report.heading(QUESTIONS["p3_analysis"], 3)
    entries = test + pair
    table = category_table(entries)
    if table:
        report.paragraph("How concentrated each token's attention map is, measured without labels: the share of the "
                         "map on its top 10% of patches, and its entropy over log(number of patches).")
        report.table(["tokens of", "count", "mean top-10% share", "mean normalised entropy"],
                     [[c, str(n), "%.3f" % share, "%.3f" % entropy] for c, n, share, entropy in table])
        report.paragraph(concentration_paragraph(entries, table))
    elif entries:
        report.paragraph("attention.json holds no per-token measures (written by an older p3_visualize.py); rerun "
                         "the p3 stage (run_all.py --force p3) to measure them.")
    if results.get("pointing_game") is not None:  # miniature world only
        report.paragraph("Pointing game (miniature world, where every object's box is known): for each shape word "
                         "whose colour-shape pair names an object of the scene, the peak of its attention map falls "
                         "inside that object's box in %s of %s cases." % (fmt(results["pointing_game"], 3),
                                                                          results.get("pointing_trials", UNKNOWN)))
    report.paragraph("Whether a caption is reasonable, and whether each attended region reflects its word, is a "
                     "judgement for a person looking at the figures above; this report does not make it. Your answer, "
                     "per caption, from %s in the results folder:" % answer_file.ANSWERS_FILE)
    for question in p3_questions(entries):
        report.question(question.qid, question.text, question.hint, answers.get(question.qid, ""),
                        answer_file.ANSWERS_FILE)


def p3_questions(entries: Sequence[dict]) -> List[answer_file.Question]:
    """One question per caption shown, with what the numbers say (its most concentrated content tokens)."""
    questions: Dict[str, answer_file.Question] = {}
    for entry in entries:
        words = sorted((t for t in entry.get("tokens") or [] if word_category(t.get("word")) == "content words"),
                       key=lambda t: -t["top10_share"])[:3]
        hint = "Most concentrated content tokens (top-10%% share): %s." % ", ".join(
            "'%s' %.2f" % (t["label"], t["top10_share"]) for t in words) if words else ""
        qid = "P3.3 %s" % entry["image"]
        questions.setdefault(qid, answer_file.Question(qid, "\"%s\": is the caption reasonable, and does each "
                                                          "attended region reflect its word?" % entry["caption"],
                                                          hint))
    return list(questions.values())


def shown(folder: str, figure_dir: str, name: str) -> str:
    """A figure's path relative to the results folder, as the report names it."""
    return os.path.relpath(os.path.join(figure_dir, name), folder)
