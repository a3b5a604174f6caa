"""A causal Transformer caption decoder trained from scratch over projected image tokens (`--arch transformer`).

The seed report's ViT + nn.TransformerDecoder, rebuilt from decoder.py's blocks so that it has what the one search
and P3 need and nn.TransformerDecoder lacks: a self-attention KV cache, image keys/values computed once per image,
and the cross-attention probabilities. Pre-LayerNorm blocks (self-attention, cross-attention without decoder.py's
tanh gate, which would start closed, MLP), learned positions, a final LayerNorm, and an output layer over the compact
vocabulary (output_vocab.py) tied to the input embedding. Every parameter is trained; nanoGPT's initialisation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hw3.models import gpt2
from hw3.util.config import config_from_dict
from hw3.models.output_vocab import FromScratchDecoder, OutputVocab

INIT_STD = 0.02  # nanoGPT / GPT-2: every Linear and Embedding weight ~ N(0, 0.02), biases 0
IMAGE_PROJECTIONS = ("linear", "mlp")
RESIDUAL_PROJECTIONS = ("attn.c_proj", "cross_attn.c_proj", "mlp.c_proj")  # each adds a branch to the residual
SUMMARY_PARTS = (("embedding", ("token_embedding.", "position_embedding.")), ("self_attn", (".ln_1.", ".attn.")),
                 ("cross_attn", (".ln_cross.", ".cross_attn.")), ("mlp", (".ln_2.", ".mlp.")),
                 ("image_proj", ("image_proj.",)), ("output", ("final_norm.",)))


@dataclass
class TransformerConfig:
    """Everything that rebuilds a TransformerDecoder. The defaults (3 x 512 wide, 8 heads of 64: the base
    Transformer's width, the depth of from-scratch COCO captioners) make about 18M parameters with a 10,000-id
    compact vocabulary; the full GPT-2 vocabulary alone would add 20M more."""

    encoder_dim: int = 0  # width of the image tokens; set by captioner.build_captioner from the encoder
    output_ids: Optional[Tuple[int, ...]] = None  # compact output layer (output_vocab.py); None = all GPT-2 ids
    block_size: int = 64  # most positions, start token included
    n_layer: int = 3
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.1  # on the embeddings, the projected image tokens and each residual branch's output
    image_proj: str = "linear"  # "linear" | "mlp", as decoder.Config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        return config_from_dict(cls, d, "transformer decoder")

    def validate(self) -> None:
        """ValueError naming the field; encoder_dim 0 (not set yet) passes, the decoder itself refuses it."""
        for field, least in (("encoder_dim", 0), ("block_size", 2), ("n_layer", 1), ("n_head", 1), ("n_embd", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError("%s must be a whole number >= %d, got %r" % (field, least, value))
        if self.n_embd % self.n_head:
            raise ValueError("n_embd %d is not divisible by n_head %d" % (self.n_embd, self.n_head))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1), got %r" % (self.dropout,))
        if self.image_proj not in IMAGE_PROJECTIONS:
            raise ValueError("image_proj must be 'linear' or 'mlp', got %r" % (self.image_proj,))
        if self.output_ids is not None:
            OutputVocab(self.output_ids)  # raises ValueError naming output_ids

    def block_config(self) -> gpt2.Config:
        """decoder.py's config for its Block: cross-attention in every block, no gate, no PEFT parts."""
        return gpt2.Config(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                              block_size=self.block_size, encoder_dim=self.encoder_dim, cross_attn_gate=False,
                              image_proj=self.image_proj, adapter_dim=0, prefix_len=0, prompt_len=0, lora_rank=0)


class ResidualProjection(nn.Linear):
    """A residual branch's output projection followed by dropout (nanoGPT's resid_dropout). It replaces the c_proj
    layers of decoder.Block, which has no dropout (its GPT-2 weights stay frozen); nn.Linear's parameter names stay."""

    def __init__(self, n_in: int, n_out: int, dropout: float):
        super().__init__(n_in, n_out)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), self.dropout, self.training)


def _add_residual_dropout(block: gpt2.Block, dropout: float) -> None:
    for parent in (block.attn, block.cross_attn, block.mlp):
        old = parent.c_proj
        parent.c_proj = ResidualProjection(old.in_features, old.out_features, dropout)


class TransformerDecoder(FromScratchDecoder):
    arch = "transformer"

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        cfg.validate()
        if cfg.encoder_dim <= 0:
            raise ValueError("the transformer decoder needs encoder_dim > 0, the image token width "
                             "(captioner.build_captioner sets it from the encoder), got %d" % cfg.encoder_dim)
        self.cfg = cfg
        self.vocab = OutputVocab(cfg.output_ids)
        block_cfg = cfg.block_config()
        block_cfg.validate()
        # input rows = output rows (+ the shared unknown row of a compact vocabulary); the head reuses the first ones
        self.token_embedding = nn.Embedding(self.vocab.input_rows, cfg.n_embd)
        self.position_embedding = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([gpt2.Block(block_cfg, i) for i in range(cfg.n_layer)])
        for block in self.blocks:
            _add_residual_dropout(block, cfg.dropout)
        self.final_norm = nn.LayerNorm(cfg.n_embd)
        layers = [nn.Linear(cfg.encoder_dim, cfg.n_embd)]
        if cfg.image_proj == "mlp":
            layers += [nn.GELU(), nn.Linear(cfg.n_embd, cfg.n_embd)]
        self.image_proj = nn.Sequential(*layers, nn.LayerNorm(cfg.n_embd))  # as decoder.Decoder's
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """nanoGPT's: N(0, 0.02) weights, zero biases, LayerNorms at identity; each residual output projection
        N(0, 0.02 / sqrt(residual branches)) as GPT-2 (three branches per block here: self, cross, MLP)."""
        residual_std = INIT_STD / math.sqrt(len(RESIDUAL_PROJECTIONS) * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(RESIDUAL_PROJECTIONS) else INIT_STD
                nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------- forward

    def image_memory(self, image_tokens: torch.Tensor) -> gpt2.ImageMemory:
        """Cross-attention keys/values for image tokens (B, N, encoder_dim); computed once per image."""
        assert image_tokens.dim() == 3 and image_tokens.shape[-1] == self.cfg.encoder_dim, \
            "image tokens must be (B, N, %d), got %s" % (self.cfg.encoder_dim, tuple(image_tokens.shape))
        image = self.dropout(self.image_proj(image_tokens))  # (B, N, n_embd)
        return gpt2.ImageMemory([block.cross_attn.memory(image) for block in self.blocks])

    def new_cache(self) -> gpt2.KVCache:
        return gpt2.KVCache(self.cfg.n_layer)

    def forward(self, tokens: torch.Tensor, image_tokens: Optional[torch.Tensor] = None,
                memory: Optional[gpt2.ImageMemory] = None, cache: Optional[gpt2.KVCache] = None,
                return_attention: bool = False, positions: Optional[torch.Tensor] = None):
        """tokens (B, T) GPT-2 ids -> logits (B, T, vocab.size), or (M, vocab.size) where `positions` (B, T) is True;
        with a cache, `tokens` are only the new ones and the cache advances. return_attention=True also returns each
        block's cross-attention probabilities (B, H, T, N)."""
        if memory is None:
            if image_tokens is None:
                raise ValueError("the transformer decoder captions images: give image_tokens or memory")
            memory = self.image_memory(image_tokens)
        assert tokens.dim() == 2, "tokens must be (B, T), got %s" % (tuple(tokens.shape),)
        past = cache.length if cache is not None else 0
        end = past + tokens.shape[1]
        if end > self.cfg.block_size:
            raise ValueError("sequence of %d positions exceeds the decoder's block_size %d"
                             % (end, self.cfg.block_size))
        x = self.token_embedding(self.vocab.inputs(tokens))  # (B, T, C)
        x = self.dropout(x + self.position_embedding(torch.arange(past, end, device=tokens.device)))
        attentions = []
        for i, block in enumerate(self.blocks):
            x, present, probs = block(x, memory.layers[i], past=cache.layers[i] if cache is not None else None,
                                      return_attention=return_attention)
            if cache is not None:
                cache.layers[i] = present
            attentions.append(probs)
        if cache is not None:
            cache.length = end
        if positions is not None:
            x = x[positions]  # (M, C)
        # the output layer is the input embedding's first vocab.size rows (the unknown row is never predicted)
        logits = F.linear(self.final_norm(x), self.token_embedding.weight[:self.vocab.size])  # (B, T, V) or (M, V)
        return (logits, attentions) if return_attention else logits

    def parameter_summary(self) -> Dict[str, int]:
        """Parameter counts per part (the output layer is tied to the token embedding; `output` is its LayerNorm),
        plus `trainable` (all of them) and `frozen` (0)."""
        parts = {part: 0 for part, _ in SUMMARY_PARTS}
        for name, p in self.named_parameters():
            part = next(part for part, marks in SUMMARY_PARTS if any(m in "." + name for m in marks))
            parts[part] += p.numel()
        parts["trainable"] = gpt2.count_parameters(self, trainable_only=True)
        parts["frozen"] = gpt2.count_parameters(self, trainable_only=False) - parts["trainable"]
        return parts


__all__ = ["TransformerConfig", "TransformerDecoder"]
