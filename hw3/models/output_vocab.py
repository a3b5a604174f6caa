"""The compact output layer of the from-scratch decoders: they predict only the GPT-2 ids seen in training, so their
output matrix is a few thousand rows instead of GPT-2's 50,257, while captions, search and scoring keep GPT-2 ids.

A decoder's output index i means GPT-2 id `output_ids[i]`; inputs are GPT-2 ids too, and an id outside the set is
embedded as one shared unknown row (it can appear in validation captions, never in generated ones).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hw3.data.tokenizer import END_TOKEN

IGNORE_INDEX = -100  # as datasets.IGNORE_INDEX and torch's cross_entropy default
GPT2_VOCAB = 50257


def collect_output_ids(captions: Iterable[Sequence[int]]) -> Tuple[int, ...]:
    """The sorted GPT-2 ids of tokenised training captions, the end token (also the start token) included."""
    seen = {END_TOKEN}
    for ids in captions:
        seen.update(int(i) for i in ids)
    return tuple(sorted(seen))


def captions_output_ids(captions: Sequence[Sequence[str]], max_tokens: int) -> Tuple[int, ...]:
    """collect_output_ids of caption texts (per image, a list each), tokenised and cut to max_tokens as training
    tokenises them: the compact output layer of a from-scratch decoder trained on them."""
    from hw3.data.datasets import tokenize_captions
    from hw3.data.tokenizer import shared_tokenizer

    tokens, _, _ = tokenize_captions(captions, shared_tokenizer(), max_tokens)
    return collect_output_ids(ids for image in tokens for ids in image)


class OutputVocab(nn.Module):
    """GPT-2 id <-> output index maps of a compact output layer (or the identity when output_ids is None)."""

    def __init__(self, output_ids: Optional[Sequence[int]], vocab_size: int = GPT2_VOCAB):
        super().__init__()
        self.compact = output_ids is not None
        if not self.compact:
            self.size, self.input_rows, self.end_index = vocab_size, vocab_size, END_TOKEN
            return
        ids = torch.tensor(list(output_ids), dtype=torch.long)
        if ids.numel() == 0 or END_TOKEN not in ids.tolist() or not bool((ids[1:] > ids[:-1]).all()) \
                or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError("output_ids must be sorted distinct GPT-2 ids in [0, %d) holding the end token %d"
                             % (vocab_size, END_TOKEN))
        self.size = ids.numel()
        self.input_rows = self.size + 1  # the last input row embeds every id outside the set
        self.end_index = ids.tolist().index(END_TOKEN)  # the end (and start) token's output index
        index = torch.full((vocab_size,), self.size, dtype=torch.long)
        index[ids] = torch.arange(self.size)
        # rebuilt from the config, never saved: a checkpoint holds only trained tensors
        self.register_buffer("output_ids", ids, persistent=False)  # (V_out,) output index -> GPT-2 id
        self.register_buffer("index", index, persistent=False)  # (vocab_size,) GPT-2 id -> row, unknown = V_out

    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """GPT-2 ids -> rows of the input embedding (unknown ids share the last row)."""
        return self.index[ids] if self.compact else ids

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        """GPT-2 ids (IGNORE_INDEX kept) -> output indices; an id the layer cannot predict becomes IGNORE_INDEX."""
        if not self.compact:
            return ids
        keep = ids != IGNORE_INDEX
        rows = self.index[ids.clamp(min=0)]
        return torch.where(keep & (rows < self.size), rows, torch.full_like(ids, IGNORE_INDEX))

    def ids(self, index: torch.Tensor) -> torch.Tensor:
        """Output indices -> GPT-2 ids."""
        return self.output_ids[index] if self.compact else index


class FromScratchDecoder(nn.Module):
    """What the decoders trained from scratch share (rnn_decoder, transformer_decoder): every parameter is trained and
    saved, strictly reloaded, no LoRA to merge, and `block_size` positions of text."""

    cfg: object
    arch = "decoder"  # the --arch name in messages

    @property
    def max_text_len(self) -> int:
        return self.cfg.block_size

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Every parameter, detached copies; the vocabulary's buffers come from the config."""
        return {name: p.detach().clone() for name, p in self.named_parameters()}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Strict: the same names and shapes as this config gives, or a ValueError naming the misfits and nothing
        loaded."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        wrong = sorted("%s %s (the config gives %s)" % (name, tuple(state[name].shape), tuple(p.shape))
                       for name, p in params.items() if name in state and state[name].shape != p.shape)
        if missing or unexpected or wrong:
            raise ValueError("checkpoint does not fit this %s decoder config: missing %s, unexpected %s, wrong shapes "
                             "%s" % (self.arch, missing[:6], unexpected[:6], "; ".join(wrong[:6]) or "none"))
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def merge_lora(self) -> int:
        return 0  # no LoRA


__all__ = ["GPT2_VOCAB", "IGNORE_INDEX", "FromScratchDecoder", "OutputVocab", "captions_output_ids",
           "collect_output_ids"]
