"""Every flag of the entry points (the course's scripts and the project's own) as it was before the toolkit became a
package: names, destinations, defaults, types, choices, nargs and whether required, read from each script's parser.

The reference, tests/data/script_flags.json, was written from commit 232d86b (the last one with the modules side by
side) by `python3 tests/e2e/test_script_flags.py OUT.json` run there; a change to a flag shows here as a difference."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from unittest import mock

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPTS = ("p1_clip_zeroshot", "p2_train", "p2_inference", "p2_evaluate", "p3_visualize", "run_all", "make_report",
           "hw3_download")
REFERENCE = os.path.join(ROOT, "tests", "data", "script_flags.json")


class _Parsed(Exception):
    """Raised by the patched parse_args, carrying the parser it was called on."""


def _grab(self, *args, **kwargs):
    raise _Parsed(self)


def _plain(value):
    if isinstance(value, str):
        return value.replace(ROOT, "<ROOT>")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return getattr(value, "__name__", type(value).__name__)


def flags(script: str) -> dict:
    """{first option string or dest: its description} of `script`'s command line."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    module = importlib.import_module(script)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _grab), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", _grab), \
            mock.patch.object(sys, "argv", [script + ".py"]):
        try:
            module.main([]) if _takes_argv(module.main) else module.main()
        except _Parsed as parsed:
            parser = parsed.args[0]
        else:
            raise AssertionError("%s.main() never parsed its arguments" % script)
    out = {}
    for action in parser._actions:
        key = action.option_strings[0] if action.option_strings else action.dest
        out[key] = dict(options=list(action.option_strings), dest=action.dest, default=_plain(action.default),
                        type=_plain(action.type), choices=_plain(list(action.choices)) if action.choices else None,
                        nargs=_plain(action.nargs), required=bool(action.required), action=type(action).__name__)
    return out


def _takes_argv(main) -> bool:
    import inspect

    return bool(inspect.signature(main).parameters)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_as_before_the_package(script):
    with open(REFERENCE, encoding="utf-8") as f:
        reference = json.load(f)[script]
    now = flags(script)
    assert sorted(now) == sorted(reference), "flags added or removed"
    for key in reference:
        assert now[key] == reference[key], key


if __name__ == "__main__":
    json.dump({s: flags(s) for s in SCRIPTS}, open(sys.argv[1], "w"), indent=1, sort_keys=True)
