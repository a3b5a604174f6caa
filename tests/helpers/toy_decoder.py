"""A toy decoder, the smallest module behind docs/DECODERS.md's step interface, and its one registry row: what the
registry's tests add to show that an architecture is one module and one row (tests/unit/models/test_architectures.py).

Each position's logits come from its own token's embedding plus the projected mean image token (a bigram model
conditioned on the image), so its decoding state only counts positions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from hw3.models import registry
from hw3.models.output_vocab import FromScratchDecoder, OutputVocab
from hw3.util.config import config_from_dict


@dataclass
class ToyConfig:
    encoder_dim: int = 0  # set by captioner.build_captioner from the encoder
    output_ids: Optional[Tuple[int, ...]] = None
    block_size: int = 64
    width: int = 16
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        return config_from_dict(cls, d, "toy decoder")

    def validate(self) -> None:
        if self.width < 1 or self.block_size < 2 or self.encoder_dim < 0:
            raise ValueError("width must be >= 1 and block_size >= 2, got %r and %r" % (self.width, self.block_size))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1), got %r" % (self.dropout,))
        if self.output_ids is not None:
            OutputVocab(self.output_ids)


class Rows:
    """A tensor whose rows are images or beams (the memory), or only a position count (the decoding state)."""

    def __init__(self, tensor: Optional[torch.Tensor] = None, length: int = 0):
        self.tensor, self.length = tensor, length

    def index_select(self, index: torch.Tensor) -> "Rows":
        return Rows(None if self.tensor is None else self.tensor.index_select(0, index), self.length)

    def repeat_interleave(self, repeats: int) -> "Rows":
        return Rows(self.tensor.repeat_interleave(repeats, dim=0), self.length)


class ToyDecoder(FromScratchDecoder):
    arch = "toy"

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        cfg.validate()
        if cfg.encoder_dim < 1:
            raise ValueError("encoder_dim is not set (captioner.build_captioner sets it)")
        self.cfg = cfg
        self.vocab = OutputVocab(cfg.output_ids)
        self.embedding = nn.Embedding(self.vocab.input_rows, cfg.width)
        self.image_proj = nn.Linear(cfg.encoder_dim, cfg.width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.width, self.vocab.size)

    def image_memory(self, image_tokens: torch.Tensor) -> Rows:
        return Rows(self.image_proj(image_tokens.mean(dim=1)))  # (B, width)

    def new_cache(self) -> Rows:
        return Rows()

    def forward(self, tokens: torch.Tensor, image_tokens: Optional[torch.Tensor] = None, memory: Optional[Rows] = None,
                cache: Optional[Rows] = None, return_attention: bool = False, positions: Optional[torch.Tensor] = None):
        memory = self.image_memory(image_tokens) if memory is None else memory
        end = (cache.length if cache is not None else 0) + tokens.shape[1]
        if end > self.cfg.block_size:
            raise ValueError("%d positions exceed block_size %d" % (end, self.cfg.block_size))
        if cache is not None:
            cache.length = end
        hidden = torch.tanh(self.embedding(self.vocab.inputs(tokens)) + memory.tensor.unsqueeze(1))  # (B, T, width)
        if positions is not None:
            hidden = hidden[positions]  # (M, width)
        logits = self.out(self.dropout(hidden))
        return (logits, [None]) if return_attention else logits

    def parameter_summary(self) -> Dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters())
        return dict(toy=trainable, trainable=trainable, frozen=0)


TOY = registry.Architecture(
    "toy", ToyConfig, ToyDecoder, from_scratch=True, summary="a bigram over the mean image token",
    options=(registry.Option("width", "toy: width (default %d)" % ToyConfig.width, int), registry.DROPOUT),
    no_attention="it sees the mean image token only")
