"""What the opt-in stages share: the metric suite of their rows, a row's cut captions, results.md's filled columns,
the compare decoding, and whether the run has the GPT-2 (then P2's best attempt is the run's best captioner; without
it, the compare stage's best architecture is)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from hw3.models import decoding
from hw3.pipeline import context
from hw3.pipeline.context import Context

SUITE = ("bleu", "meteor", "rouge", "cider", "clipscore")  # each distill and compare row's scores (metrics.py names)
ROW_KEYS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "CLIPScore")
CUT_KEYS = ("cut", "max_len")  # context.caption_and_score's count of cut captions, and the length they reached


def has_gpt2(ctx: Context) -> bool:
    """The course's layout, or --captions with --decoder-weights: P2 runs, and its best attempt teaches and is
    fine-tuned; without it, the compare stage's best architecture is the run's best captioner."""
    return not ctx.args.captions or bool(ctx.args.decoder_weights)


def compare_decoding() -> dict:
    """The compare stage's decoding of every architecture (the README default), read when called (tests shorten
    context.DECODING_GRID)."""
    return dict(decoding.DECODE_DEFAULTS, **context.DECODING_GRID[0])


def best_arch(rows: dict, archs: Tuple[str, ...]) -> Optional[str]:
    """The best of `archs` among compare rows by CIDEr on val (ties: the earlier), None when none is scored."""
    scored = [a for a in archs if a in rows and rows[a].get("CIDEr") is not None]
    return max(scored, key=lambda a: rows[a]["CIDEr"]) if scored else None


def row_cut(row: dict) -> Dict[str, Optional[int]]:
    """A scored row's "cut" and "max_len" (CUT_KEYS), for another row scored on the same captions."""
    return {k: row.get(k) for k in CUT_KEYS}


def filled(keys: Tuple[str, ...], rows) -> Tuple[str, ...]:
    """The columns of a results.md table that some row fills (the world-only ones are None on other data)."""
    rows = list(rows)
    return tuple(k for k in keys if any(row.get(k) is not None for row in rows))
