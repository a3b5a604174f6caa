"""The opt-in stages' table: one row each (stage_row.OptionalStage), from which run_all's --with, its argparse
groups, the plan, the checks before any work, the stages' records and results.md's sections come. A new opt-in stage
is one module with one row, added here."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

from hw3.pipeline.layout import STAGE_DATA
from hw3.pipeline.stage_row import OptionalStage
from hw3.pipeline.stages import compare, distill, scst

if TYPE_CHECKING:
    from hw3.pipeline.context import Context

CORE_STAGES = ("p1", "p2", "p3", "report")  # always run (P1 and P3 only on the course's data)
TABLE: Dict[str, OptionalStage] = {row.name: row for row in (distill.STAGE, compare.STAGE, scst.STAGE)}
# The earlier stages whose outputs a core stage reads; the report and extra stages read every stage before them.
CORE_UPSTREAM = dict(p1=(), p2=(), p3=("p2",))


def stage_data(name: str) -> Tuple[str, ...]:
    """The parts of --data a stage reads (layout.DATA keys); none for an extra stage."""
    return TABLE[name].data if name in TABLE else STAGE_DATA.get(name, ())


def declared_upstream(ctx: Context, name: str) -> Tuple[str, ...]:
    """The earlier stages a core or opt-in stage says it reads; () for the report and extra stages."""
    return TABLE[name].upstream(ctx) if name in TABLE else CORE_UPSTREAM.get(name, ())


def running_order(ctx: Context, names: List[str]) -> List[str]:
    """The opted-in stages in the table's order, each after the opt-in stages it reads (without the GPT-2, compare
    before distill and scst, which start from its best architecture)."""
    waiting, order = [n for n in TABLE if n in names], []
    while waiting:
        ready = next((n for n in waiting if not set(TABLE[n].upstream(ctx)) & set(waiting) - {n}), waiting[0])
        order.append(ready)
        waiting.remove(ready)
    return order
