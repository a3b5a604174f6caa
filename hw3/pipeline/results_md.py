"""results.md: a section for each stage that ran, none for those that did not; the opt-in stages' sections come from
their rows in the stage table."""
from __future__ import annotations

from hw3.pipeline.scoring import cut_lines, setting_name
from hw3.pipeline.stage_table import TABLE


def results_table(results: dict) -> str:
    """results.md: a section for each stage that ran, none for those that did not."""
    measures = []
    for key in ("p1_accuracy", "p1_single_prompt_accuracy", "p1_heldout_accuracy", "p1_heldout_accuracy_all_classes"):
        if results.get(key) is not None:
            measures.append("| %s | %.4f |" % (key, results[key]))
    for p in results.get("p1_prompts", []):
        measures.append("| P1 prompt: %s | %.4f |" % (p["templates"].replace("|", "\\|"), p["accuracy"]))
    lines = ["| measure | value |", "| --- | --- |"] + measures if measures else []
    if results.get("data"):
        lines += ["", data_table(results["data"])]
    rows = results.get("p2") or {}
    if rows:
        extra = [k for k in ("object_f1", "exact_object_set") if all(k in r for r in rows.values())]
        train = (results.get("timings") or {}).get("p2_train", {})
        lines += ["", "| PEFT | CIDEr | CLIPScore | %strainable params | training s |" % "".join(
            k.replace("_", " ") + " | " for k in extra), "| --- " * (5 + len(extra)) + "|"]
        for method, r in rows.items():
            lines.append("| %s%s | %.4f | %.4f | %s%s | %s |" % (
                method, " (best)" if method == results.get("p2_best") else "", r["cider"], r["clipscore"],
                "".join("%.4f | " % r[k] for k in extra), "{:,}".format(r["trainable_params"]), train.get(method, "-")))
    if results.get("p2_decoding"):
        lines += ["", "| decoding of %s | CIDEr | CLIPScore |" % results.get("p2_best"), "| --- | --- | --- |"]
        for d in results["p2_decoding"]:
            lines.append("| %s | %.4f | %.4f |" % (setting_name(d), d["cider"], d["clipscore"]))
        lines += ["", "chosen: %s (%s)" % (setting_name(results["p2_inference"]), results["p2_inference"]["chosen_on"])]
    cuts = cut_lines(rows, "P2") + cut_lines({setting_name(d): d for d in results.get("p2_decoding") or []},
                                              "decoding")
    lines += [""] + cuts if cuts else []
    for e in results.get("p3_best_worst", []):
        lines += ["", "P3 %s: CLIPScore %.4f, \"%s\"" % (e["image"], e["clipscore"], e["caption"])]
    for row in TABLE.values():
        for section in row.table(results):
            lines += ["", section]
    if "pointing_game" in results:
        lines += ["", "attention pointing game: %s over %s shape words" % (
            "n/a" if results["pointing_game"] is None else "%.4f" % results["pointing_game"],
            results.get("pointing_trials"))]
    return "\n".join(lines).lstrip("\n") + "\n"


def data_table(data: dict) -> str:
    """A --captions run's data: format, splits, training caption lengths, what each training cut."""
    tokens = data["caption_tokens"]
    lines = ["| data: %s | train | val | caption tokens (GPT-2): min | median | p95 | max |" % data["format"],
             "| --- " * 7 + "|", "| images | %d | %d | %d | %g | %d | %d |" % (
                 data["splits"]["train"], data["splits"]["val"], tokens["min"], tokens["median"], tokens["p95"],
                 tokens["max"])]
    cut = ["%s %d of %d (at %d tokens)" % (name, c["cut"], tokens["captions"], c["max_caption_tokens"])
           for name, c in sorted((data.get("cut") or {}).items())]
    if cut:
        lines += ["", "training captions cut: " + "; ".join(cut)]
    return "\n".join(lines)
