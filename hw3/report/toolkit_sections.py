"""The report's sections of the opt-in stages (compare, distill, scst) and of a run_all.py --captions run (its data
and attention maps), each set beside the published table it answers where there is one."""
from __future__ import annotations

import os
from typing import Dict, Sequence

from hw3.report import published
from hw3.report.layout import Report
from hw3.report.wording import UNKNOWN, active_decoding, count, fmt, plain, say_cut, setting, settings_text

COMPARE_COLUMNS = (("CIDEr", "CIDEr"), ("BLEU-4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE-L"),
                   ("CLIPScore", "CLIPScore"), ("object_f1", "object F1"), ("exact_object_set", "exact set"),
                   ("pointing_game", "pointing"))
SCST_COLUMNS = (("CIDEr", "CIDEr"), ("CLIPScore", "CLIPScore"), ("BLEU-4", "BLEU-4"), ("object_f1", "object F1"),
                ("exact_object_set", "exact set"))
SCST_SETTINGS = (("scst_epochs", "epochs"), ("scst_samples", "samples per image"), ("scst_baseline", "baseline"),
                 ("scst_lr", "learning rate"), ("scst_temperature", "temperature"), ("scst_end_word", "end word"),
                 ("scst_clip_weight", "CLIP weight"), ("best_epoch", "best epoch"))


def data_section(report: Report, data: dict):
    """run_all.py --captions: the data the run read, its caption lengths and what was cut."""
    report.new_page()
    report.heading("The data")
    for key, label in (("format", "caption file format"), ("splits", "split sizes"),
                       ("caption_tokens", "caption length in GPT-2 tokens"), ("cut", "captions cut")):
        if data.get(key) is not None:
            report.paragraph("%s: %s." % (label[0].upper() + label[1:], plain(data[key])), bullet=True)
    for key in sorted(set(data) - {"format", "splits", "caption_tokens", "cut"}):
        report.paragraph("%s: %s." % (key.replace("_", " "), plain(data[key])), bullet=True)


def attention_section(report: Report, results: dict, folder: str):
    """run_all.py --captions: the best attentive architecture's attention maps, its best and worst captions."""
    attention = results["attention"]
    report.heading("Attention maps of %s" % attention.get("arch", "the best attentive architecture"))
    for name in attention.get("figures") or []:
        report.image(os.path.join(folder, name), name, caption=os.path.splitext(os.path.basename(name))[0])
    for side in ("best", "worst"):
        entry = attention.get(side)
        if isinstance(entry, dict):
            rest = {k: v for k, v in entry.items() if k != "caption"}
            report.paragraph("%s caption: \"%s\" (%s)." % (side.capitalize(), entry.get("caption", UNKNOWN),
                                                            plain(rest)), bullet=True)


def ranking(rows: Dict[str, dict], names: Sequence[str]) -> str:
    """'gru < attention-gru < transformer' by CIDEr, over the names that have a score."""
    scored = sorted((n for n in names if (rows.get(n) or {}).get("CIDEr") is not None), key=lambda n: rows[n]["CIDEr"])
    return " < ".join(scored)


def compare_section(report: Report, results: dict):
    """The classic architectures beside the PEFT GPT-2 (run_all.py --with compare), with the published table."""
    rows = results.get("compare") or {}
    report.heading("Architecture comparison: classic captioners beside the PEFT GPT-2")
    report.paragraph("Each architecture was trained on the same data and image features (the frozen encoder's "
                     "tokens, one feature cache) and its validation captions decoded with the README default and "
                     "scored with the same metrics (run_all.py, the compare stage).%s" % (
                         " gpt2 is P2's best PEFT attempt." if "gpt2" in rows else ""))
    columns = [(key, label) for key, label in COMPARE_COLUMNS if any(r.get(key) is not None for r in rows.values())]
    counts = [(key, label, show) for key, label, show in (("trainable_params", "trained params", count),
                                                          ("train_seconds", "train s", lambda v: fmt(v, 0)))
              if any(r.get(key) is not None for r in rows.values())]
    share = (0.82 - 0.12 * len(counts)) / max(1, len(columns))  # the scores share what the name and counts leave
    report.table(["architecture"] + [label for _, label in columns] + [label for _, label, _ in counts],
                 [[arch + (" (%s)" % r["peft"] if r.get("peft") else "")] + [fmt(r.get(key), 3) for key, _ in columns]
                  + [show(r.get(key)) for key, _, show in counts] for arch, r in rows.items()],
                 widths=[0.18] + [share] * len(columns) + [0.12] * len(counts))
    say_cut(report, rows)
    missing = [label for key, label in COMPARE_COLUMNS[:5] if all(r.get(key) is None for r in rows.values())]
    if missing:
        report.paragraph("Not measured here: %s (METEOR needs Java)." % ", ".join(missing))
    report.heading("Beside the published DeepFashion table", 3)
    report.table(["published model", "CIDEr (DeepFashion)", "ours: architecture", "CIDEr (these data)"],
                 [[model, "%.3f" % cider, arch, fmt((rows.get(arch) or {}).get("CIDEr"), 3)]
                  for model, arch, cider in published.DEEPFASHION_CAPTIONERS], widths=(0.36, 0.2, 0.24, 0.2))
    ours = ranking(rows, [arch for _, arch, _ in published.DEEPFASHION_CAPTIONERS])
    seed = " < ".join(arch for _, arch, _ in sorted(published.DEEPFASHION_CAPTIONERS, key=lambda s: s[2]))
    report.paragraph("Source of the left half: %s, CIDEr as published. The ranking by CIDEr there is %s; "
                     "here it is %s%s. The datasets, encoders and training budgets differ, so only the ranking is "
                     "comparable, not the numbers." % (published.COURSE_PROJECT_REPORT, seed, ours or "not measured",
                                          "" if ours == seed else " (it differs)"))
    ablation = results.get("ablation") or {}
    if ablation:
        report.heading("Ablation: the doubly stochastic attention term of attention-gru", 3)
        report.table(["run", "--attention-reg", "CIDEr", "pointing game"],
                     [[name, setting(a.get("attention_reg")), fmt(a.get("CIDEr"), 3), fmt(a.get("pointing_game"), 3)]
                      for name, a in ablation.items()])
        report.paragraph("attention-gru trained with Show-Attend-Tell's term (1 - sum over steps of each patch's "
                         "attention)^2 at weight 1, against the same run at 0. The term pushes every patch to be "
                         "attended about once over the caption.%s" % (
                             " The pointing game (miniature world only) asks whether each shape word's attention peak "
                             "lies on its object." if any(a.get("pointing_game") is not None
                                                          for a in ablation.values()) else ""))



def ratio(before, after) -> str:
    return "%.3fx" % (after / before) if before and after is not None else UNKNOWN


def percent_change(before, after) -> str:
    return "%+.1f %%" % (100.0 * (after - before) / before) if before and after is not None else UNKNOWN


def scst_section(report: Report, results: dict):
    """Only when the scst stage ran (run_all --with scst): before and after, and captions that changed."""
    scst = results["scst"]
    before, after, s = scst.get("before") or {}, scst.get("after") or {}, scst.get("settings") or {}
    report.heading("Self-critical fine-tuning (CIDEr-optimised)")
    method = scst.get("method", UNKNOWN)
    report.paragraph("The %s attempt (%s) was fine-tuned by self-critical sequence training (Rennie et al. "
                     "2017): each training image's sampled captions are rewarded by CIDEr-D against its references, "
                     "less a baseline, and only the trained parameters move (%s). Both checkpoints are scored on the "
                     "validation split with the shipped decoding (%s)." % (
                         method, "P2's best" if method == results.get("p2_best") else "chosen by --scst-method",
                         ", ".join("%s %s" % (label, setting(s[k])) for k, label in SCST_SETTINGS if k in s),
                         settings_text(active_decoding(s.get("decoding") or {}))))
    columns = [(k, label) for k, label in SCST_COLUMNS if before.get(k) is not None or after.get(k) is not None]
    report.table(["checkpoint"] + [label for _, label in columns],
                 [[side] + [fmt(row.get(k), 3) for k, _ in columns] for side, row in (("before", before),
                                                                                      ("after", after))])
    say_cut(report, dict(before=before, after=after))
    report.paragraph("CIDEr after / before: %s; CLIPScore: %s." % (
        ratio(before.get("CIDEr"), after.get("CIDEr")),
        percent_change(before.get("CLIPScore"), after.get("CLIPScore"))))
    changed = scst.get("changed") or []
    if changed:
        report.heading("Captions that changed (most improved, then most worsened, by CIDEr)", 3)
        for c in changed:
            marks = ""
            if "objects_right_before" in c:
                marks = "; objects %s -> %s" % tuple("right" if c[k] else "wrong"
                                                     for k in ("objects_right_before", "objects_right_after"))
            report.paragraph("%s: \"%s\" -> \"%s\" (CIDEr %.3f -> %.3f%s)" % (
                c["image"], c["before"], c["after"], c["cider_before"], c["cider_after"], marks), bullet=True)


def teacher_name(teacher: dict) -> str:
    """P2's best captioner, or without the GPT-2 the architecture run_all chose and why."""
    arch = teacher.get("arch", "gpt2")
    return "the best P2 captioner" if arch == "gpt2" else "the %s captioner, %s" % (
        arch, teacher.get("chosen_on") or "the run's best")


def distill_section(report: Report, results: dict):
    """Only when the distill stage ran (run_all --with distill)."""
    rows = results.get("distill") or {}
    report.heading("Learning from a teacher's captions: precise against creative")
    teacher = rows.get("teacher") or {}
    decoding = teacher.get("decoding") or {}
    report.paragraph("The teacher is %s. It captions the training images twice: precise, with its "
                     "shipped decoding (%s), and creative, sampled (%s). A %s student is trained three times with "
                     "identical settings, on the human captions and on each teacher caption set; every row is scored "
                     "on the validation split's human references." % (
                         teacher_name(teacher), settings_text(active_decoding(decoding.get("precise") or {})),
                         settings_text(active_decoding(decoding.get("creative") or {})),
                         (rows.get("human") or {}).get("arch", UNKNOWN)))
    keys = [k for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "CLIPScore", "object_f1", "captions_per_image")
            if any(row.get(k) is not None for row in rows.values())]  # object F1: the miniature world's only
    labels = dict(object_f1="object F1", captions_per_image="captions/image")

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        return "%g" % value if key == "captions_per_image" and value is not None else fmt(value, 3)
    report.table(["trained on"] + [labels.get(k, k) for k in keys],
                 [["the teacher itself" if name == "teacher" else name] + [cell(row, k) for k in keys]
                  for name, row in rows.items()], widths=[0.19] + [0.66 / (len(keys) - 1)] * (len(keys) - 1) + [0.15])
    say_cut(report, rows)
    report.heading("The published table beside it", 3)
    report.table(["trained on", "CIDEr", "BLEU", "METEOR", "ROUGE-L"],
                 [[name] + [fmt(v[k], 3) for k in ("CIDEr", "BLEU", "METEOR", "ROUGE")]
                  for name, v in published.DISTILLED_STUDENTS],
                 widths=(0.32, 0.17, 0.17, 0.17, 0.17))
    report.paragraph("Source: %s." % published.DISTILLED_STUDENTS_CITATION)
