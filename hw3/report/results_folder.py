"""The results folder the report reads: results.json, and the files a committed copy of the folder needs."""
from __future__ import annotations

import os
from typing import List

from hw3.report import answer_file
from hw3.util.errors import UserError
from hw3.util.files import atomic_dir, read_json


def read_results(results_dir: str) -> dict:
    results = read_json(os.path.join(results_dir, "results.json"), "results file")
    if not isinstance(results, dict):
        raise UserError("%s/results.json must be a JSON object" % results_dir)
    return results


def report_files(results_dir: str) -> List[str]:
    """Every file of a results folder that the report reads (relative paths), for a committed copy of the folder."""
    results = read_json(os.path.join(results_dir, "results.json"), "results file")
    files = ["results.json", "results.md", answer_file.ANSWERS_FILE] + list((results.get("files") or {}).values())
    if isinstance(results.get("attention"), dict):
        files += list(results["attention"].get("figures") or [])
    p2 = os.path.join(results_dir, "p2")
    if os.path.isdir(p2):  # each method's captions of the val split: the reference the committed checkpoints must give
        files += [os.path.join("p2", m, "pred.json") for m in sorted(os.listdir(p2))]
    if isinstance(results.get("scst"), dict) and results["scst"].get("method"):  # the self-critical captions too
        files.append(os.path.join("scst", results["scst"]["method"], "pred.json"))
    for index in ("p3/attention.json", "p3/best_worst/attention.json"):
        if os.path.isfile(os.path.join(results_dir, index)):
            folder = os.path.dirname(index)
            files += [index, os.path.join(folder, "index.md")]
            files += [os.path.join(folder, e["figure"]) for e in read_json(os.path.join(results_dir, index))["figures"]
                      if e.get("figure")]
    return sorted(set(f for f in files if os.path.isfile(os.path.join(results_dir, f))))


def copy_results(results_dir: str, dest: str) -> str:
    """Replaces `dest` (empty or an earlier copy: it must hold results.json) with the files the report reads, so no
    figure of an earlier run is left behind; answers already written in `dest` are kept when the source has none."""
    import shutil

    kept = os.path.join(dest, answer_file.ANSWERS_FILE)
    with atomic_dir(dest, "results.json", "results") as tmp:
        names = report_files(results_dir)
        for name in names:
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            shutil.copyfile(os.path.join(results_dir, name), os.path.join(tmp, name))
        if answer_file.ANSWERS_FILE not in names and os.path.isfile(kept):
            shutil.copyfile(kept, os.path.join(tmp, answer_file.ANSWERS_FILE))
    return dest
