"""P2 in the report: the best PEFT attempt with its own settings and shipped decoding, the attempts' table, the
decoding table and the loss curves."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from hw3.report.layout import Report
from hw3.report.questions import QUESTIONS
from hw3.report.wording import UNKNOWN, active_decoding, count, fmt, say_cut, setting, settings_text


def training_text(row: dict) -> str:
    training = row.get("training")
    if not training:
        return "training settings not recorded in results.json"
    names = (("lr", "learning rate"), ("epochs", "epochs"), ("batch_size", "batch size"))
    return ", ".join("%s %s" % (label, setting(training.get(key, UNKNOWN))) for key, label in names)


def peft_text(row: dict) -> str:
    return settings_text(row["peft"]) if row.get("peft") else "PEFT settings not recorded in results.json"


def world_columns(methods: Dict[str, dict]) -> List[Tuple[str, str]]:
    """Object F1 and exact set, when every row holds them (the miniature world's captions name known objects)."""
    return [(key, label) for key, label in (("object_f1", "object F1"), ("exact_object_set", "exact set"))
            if all(row.get(key) is not None for row in methods.values())]


def p2_section(report: Report, results: dict, folder: str):
    report.heading("Problem 2: PEFT for image captioning (evaluation metrics)")
    methods = results.get("p2") or {}
    if not methods:
        report.paragraph("The results hold no P2 scores (the p2 stage did not run).")
        return
    best = results.get("p2_best") or max(methods, key=lambda m: methods[m].get("cider") or 0)
    row = methods[best]
    report.heading(QUESTIONS["p2_best"], 3)
    world = "".join(", %s %s" % (label, fmt(row[key])) for key, label in world_columns({best: row}))
    report.paragraph("The best attempt by CIDEr on the validation split is %s: CIDEr %s, CLIPScore %s%s, with %s "
                     "trainable parameters." % (best, fmt(row.get("cider")), fmt(row.get("clipscore")), world,
                                                count(row.get("trainable_params"))))
    if row.get("encoder"):
        report.paragraph("Image encoder: %s." % row["encoder"], bullet=True)
    report.paragraph("PEFT, %s: %s." % (best, peft_text(row)), bullet=True)
    report.paragraph("Training: %s." % training_text(row), bullet=True)
    inference = results.get("p2_inference") or {}
    if inference:
        report.paragraph("Decoding, shipped with the checkpoint (p2_best.json): %s; chosen by %s." % (
            settings_text(active_decoding(inference)), inference.get("chosen_on", UNKNOWN)), bullet=True)
    else:
        report.paragraph("Decoding: not recorded (the decoding stage did not run).", bullet=True)
    report.heading(QUESTIONS["p2_attempts"], 3)
    extra = world_columns(methods)
    report.table(["method", "CIDEr", "CLIPScore"] + [label for _, label in extra] + ["trainable params"],
                 [[m + (" (best)" if m == best else ""), fmt(v.get("cider")), fmt(v.get("clipscore"))]
                  + [fmt(v[key]) for key, _ in extra] + [count(v.get("trainable_params"))]
                  for m, v in sorted(methods.items())])
    say_cut(report, methods)
    for method, v in sorted(methods.items()):
        report.paragraph("%s: %s; %s." % (method, peft_text(v), training_text(v)), bullet=True)
    decoding = results.get("p2_decoding") or []
    if decoding:
        report.heading("Decoding of the best attempt on the validation data", 3)
        report.table(["method", "beam size", "length penalty", "CIDEr", "CLIPScore"],
                     [[d["method"], str(d["beam_size"]) if d["method"] == "beam" else "-",
                       fmt(d["length_penalty"], 1) if d["method"] == "beam" else "-", fmt(d.get("cider")),
                       fmt(d.get("clipscore"))] for d in decoding])
    curves = results.get("files", {}).get("p2_loss_curves")
    if curves:
        report.image(os.path.join(folder, curves), curves, caption="Training loss of the p2_train.py runs.")
