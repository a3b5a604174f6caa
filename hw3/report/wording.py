"""Numbers, settings and paths as the report writes them: one way for every section."""
from __future__ import annotations

import os
import re
from typing import Dict

from hw3.report.layout import Report

UNKNOWN = "unknown"


def fmt(value, digits: int = 4) -> str:
    return "-" if value is None else ("%.*f" % (digits, value) if isinstance(value, float) else str(value))


def setting(value) -> str:
    """A setting as a person writes it: floats short (0.0005, 5e-05, 16), lists without quotes."""
    if isinstance(value, float):
        return "%g" % value
    if isinstance(value, (list, tuple)):
        return "[%s]" % ", ".join(setting(v) for v in value)
    return str(value)


def count(value) -> str:
    return UNKNOWN if value is None else "{:,}".format(value)


def settings_text(settings: Dict[str, object]) -> str:
    return ", ".join("%s=%s" % (k, setting(v)) for k, v in settings.items())


def say_cut(report: Report, rows: Dict[str, dict]):
    """The scored captions that hit the length limit without their end token, wherever there are any."""
    cut = [(name, row["cut"]) for name, row in rows.items() if isinstance(row, dict) and row.get("cut")]
    if cut:
        report.paragraph("Captions cut at the length limit (no end token), so scored shorter than decoded: %s." % (
            ", ".join("%s %s" % (name, setting(n)) for name, n in cut)))


def plain(value) -> str:
    """A results.json value in words: a dict as 'key value, ...', a list as '[a, b]', a number as setting()."""
    if isinstance(value, dict):
        return ", ".join("%s %s" % (k, plain(v)) for k, v in value.items())
    return setting(value)


def shown_path(path) -> str:
    """A path as the report may print it: relative as given, an absolute one by its last component only (the
    machine's folders are nobody else's business and would not resolve elsewhere)."""
    path = str(path)
    return ".../" + os.path.basename(path.rstrip("/\\")) if os.path.isabs(path) else path


def shown_command(command) -> str:
    """The command with each absolute path shown by shown_path (an option's '--x=/abs' too)."""
    return re.sub(r"(?<![^\s=])/[^\s'\"]+", lambda m: shown_path(m.group(0)), str(command))


def active_decoding(inference: dict) -> Dict[str, object]:
    """The shipped decoding without the settings its method ignores (greedy has no beam width or length penalty)."""
    inactive = () if inference.get("method") == "beam" else ("beam_size", "length_penalty")
    return {k: v for k, v in inference.items() if k != "chosen_on" and k not in inactive}
