"""One opt-in stage (run_all.py --with NAME) as one row: everything run_all needs of it, so run_all names no stage's
internals (the table of rows: stage_table.py)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

if TYPE_CHECKING:
    from hw3.pipeline.context import Context


def no_options(parser: argparse.ArgumentParser) -> None:
    """A stage with no options of its own adds no argparse group."""


def nothing_to_check(_) -> None:
    """A stage whose options need no check beyond argparse's."""


def reads_nothing(_) -> List[str]:
    return []


@dataclass(frozen=True)
class OptionalStage:
    """name: what --with, --only and --force call it and its record's name (OUT/stages/NAME.json);
    about: its line in the plan;
    add_options: its argparse group (none for a stage without options);
    check_args: its options after parsing (may add itself to --with: --scst), one line naming a wrong one;
    check: its inputs and trainings' options through p2_train.py's checks, before any work;
    settings: what its results depend on besides files (its record: changed settings rerun it);
    data: the parts of --data it reads (layout.DATA keys), checked first and fingerprinted in its record;
    upstream: the earlier stages whose outputs it reads (their records' fingerprints are its inputs; one that is
      missing stops the run before any work);
    reads: the earlier stages' checkpoints it reads (with their JSON), fingerprinted as its inputs;
    scored: the committed checkpoints it scores in its trainings' place (--score-checkpoints), inputs too;
    trainings: its trainings' run folders (OUT/NAME/RUN/train), or None for one per --methods;
    run: the stage: the results to merge into results.json, the files it wrote under "outputs" (relative to OUT);
    table: its results.md section from results.json (empty when it did not run);
    config_entries: the --train-config entries it reads (None: the one named as the stage);
    on_captions: it runs on every --captions run, without --with;
    missing_line: the line for a stage that reads this one's results and finds none (stage, OUT, "that is still
      true" or "")."""
    name: str
    about: Callable[[Context], str]
    run: Callable[[Context], dict]
    settings: Callable[[Context], dict]
    data: Tuple[str, ...]
    upstream: Callable[[Context], Tuple[str, ...]]
    table: Callable[[dict], List[str]]
    add_options: Callable[[argparse.ArgumentParser], None] = no_options
    check_args: Callable[[argparse.Namespace], None] = nothing_to_check
    check: Callable[[Context], None] = nothing_to_check
    reads: Callable[[Context], List[str]] = reads_nothing
    scored: Callable[[Context], List[str]] = reads_nothing
    trainings: Optional[Tuple[str, ...]] = ()
    config_entries: Optional[Tuple[str, ...]] = None
    on_captions: bool = False
    missing_line: Optional[Callable[[str, str, str], str]] = None

    def needed_by(self, stage: str, out: str, which: str = "") -> str:
        """The line for `stage`, which reads this stage's results, when OUT has none (`which`: "that is still true")."""
        if self.missing_line is not None:
            return self.missing_line(stage, out, which)
        return "%s reads the %s stage's results, but %s has no finished %s stage%s: add %s to --only" % (
            stage, self.name, out, self.name, " " + which if which else "", self.name)

    def entries(self) -> Tuple[str, ...]:
        return (self.name,) if self.config_entries is None else self.config_entries
