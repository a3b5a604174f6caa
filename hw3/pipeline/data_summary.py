"""results.json "data" of a --captions run: the caption file's format, its splits, and its training captions' lengths
in GPT-2 tokens with what each training's caption length cuts."""
from __future__ import annotations

import math
import statistics
from typing import List

from hw3.data import caption_files, datasets
from hw3.data.tokenizer import shared_tokenizer
from hw3.pipeline.context import Context
from hw3.training.data import data_caption_tokens

CAPTION_PERCENTILE = 95  # results.json data.caption_tokens.p95
UNCUT = 10 ** 9  # a caption length no caption reaches: tokenize_captions cuts nothing


def length_summary(lengths: List[int]) -> dict:
    """min, median, 95th percentile (nearest rank) and max of caption lengths in tokens."""
    ordered = sorted(lengths)
    rank = max(1, math.ceil(CAPTION_PERCENTILE / 100 * len(ordered)))
    return dict(min=ordered[0], median=statistics.median(ordered), p95=ordered[rank - 1], max=ordered[-1])


def describe_data(ctx: Context) -> dict:
    """results.json "data" of a --captions run: the caption file's format, its split sizes, the training captions'
    lengths in GPT-2 tokens (as p2_train.py cleans and tokenizes them) and, per training, how many of them its
    --max-caption-tokens (given, or p2_train's default from these captions) cuts (datasets.tokenize_captions' count)."""
    train, val = (caption_files.load_captions(ctx.args.captions, ctx.args.images, split=s) for s in ("train", "val"))
    tokens, _, _ = datasets.tokenize_captions(train.captions, shared_tokenizer(), UNCUT)
    lengths = [len(t) for caps in tokens for t in caps]
    limits = {name: options.max_caption_tokens if isinstance(options.max_caption_tokens, int)
              else data_caption_tokens(max(lengths, default=0)) for name, options in ctx.train_options.items()}
    cut = {name: dict(max_caption_tokens=limit, cut=sum(1 for n in lengths if n > limit))
           for name, limit in limits.items()}
    return dict(format=caption_files.read_captions(ctx.args.captions).format,
                splits=dict(train=len(train.names), val=len(val.names)),
                caption_tokens=dict(length_summary(lengths), captions=len(lengths)), cut=cut)
