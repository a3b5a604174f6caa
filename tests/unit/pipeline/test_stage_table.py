"""A new opt-in stage is one row of the stage table: once registered it is among --with's stages, has its own
argparse group, its line in the plan, its record in OUT/stages/ and its results.md section, and it runs (then is
skipped while still true). Nothing else of run_all names it."""
from __future__ import annotations

import argparse
import os

import pytest

from hw3.pipeline import records, results_md, run_all, stage_table
from hw3.pipeline.stage_row import OptionalStage
from hw3.util.errors import UserError


def add_toy_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("toy (--with toy): a stage of one row")
    g.add_argument("--toy-words", type=int, default=2, help="how many words the toy stage writes")


def run_toy(ctx) -> dict:
    path = ctx.path("toy", "words.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("toy " * ctx.args.toy_words)
    return dict(toy=dict(words=ctx.args.toy_words), outputs=["toy/words.txt"])


TOY = OptionalStage(name="toy", about=lambda ctx: "writes %d words" % ctx.args.toy_words, run=run_toy,
                    settings=lambda ctx: dict(words=ctx.args.toy_words), data=(), upstream=lambda ctx: (),
                    table=lambda results: ["toy: %d words" % results["toy"]["words"]] if results.get("toy") else [],
                    add_options=add_toy_options)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(stage_table.TABLE, "toy", TOY)


def toy_argv(tmp_path, *more: str) -> list:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return ["--data", str(data), "--out", str(tmp_path / "out"), "--with", "toy", "--only", "toy", "--device", "cpu",
            "--workers", "0"] + list(more)


def test_an_unregistered_stage_is_refused(tmp_path):
    with pytest.raises(UserError, match="--with toy: not an opt-in stage \\(distill, compare, scst\\)"):
        run_all.parse_args(toy_argv(tmp_path))


def test_a_registered_row_is_an_opt_in_stage_with_its_own_options(toy, tmp_path):
    parser = run_all.build_parser()
    assert "toy (--with toy): a stage of one row" in [g.title for g in parser._action_groups]
    with_help = next(a.help for a in parser._actions if a.dest == "with_stages")
    assert "(distill, compare, scst, toy)" in with_help
    args = run_all.parse_args(toy_argv(tmp_path, "--toy-words", "3"))
    assert args.with_stages == ["toy"] and args.toy_words == 3


def test_a_registered_row_runs_with_its_plan_line_record_and_section(toy, tmp_path, capsys):
    argv = toy_argv(tmp_path, "--toy-words", "3")
    assert run_all.main(argv) == 0
    err = capsys.readouterr().err
    assert "  toy      writes 3 words [to run]" in err and "toy: done in" in err
    out = str(tmp_path / "out")
    assert open(os.path.join(out, "toy", "words.txt"), encoding="utf-8").read() == "toy toy toy "
    record = records.read_record(out, "toy")
    assert record["settings"] == dict(words=3) and list(record["outputs"]) == ["toy/words.txt"]
    assert record["results"]["toy"] == dict(words=3)
    assert "toy: 3 words" in results_md.results_table(record["results"])

    assert run_all.main(argv) == 0  # still true: skipped
    assert "toy: done earlier" in capsys.readouterr().err
    assert run_all.main(toy_argv(tmp_path, "--toy-words", "4")) == 0  # its settings changed: run again
    assert "toy: running again" in capsys.readouterr().err
