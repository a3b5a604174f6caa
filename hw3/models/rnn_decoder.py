"""The from-scratch recurrent captioners, the baselines that show what GPT-2 and cross-attention add: `gru`, a GRU fed
the mean image feature at every step (the GRUDecoder of the course project report by Zhao, Wang and Zhang, §3.2.1),
and `attention-gru`, Show-Attend-Tell's soft attention (Xu et al. 2015; sgrvinod's
a-PyTorch-Tutorial-to-Image-Captioning `models.py`) with a GRU cell where the tutorial has an LSTM (the same report's
§3.2.2). Both are small enough to train fully, every parameter trainable, and they implement docs/DECODERS.md, so the
one search drives them: the image memory holds the initial hidden state and the per-image tensors every step reads,
and the decoding state is the hidden state of each row.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hw3.util.config import config_from_dict
from hw3.models.output_vocab import FromScratchDecoder, OutputVocab

ARCHS = ("gru", "attention-gru")
GLOBAL_POOLS = ("mean", "cls")
EMBEDDING_INIT = 0.1  # embedding and output weights start uniform in (-0.1, 0.1), as the tutorial and the seed
# Top-level module name -> parameter_summary part.
PARTS = dict(embedding="embedding", image_proj="image_proj", init_h="init_hidden", attention="attention",
             f_beta="attention", rnn="rnn", fc="output")


@dataclass
class RNNConfig:
    """Everything that rebuilds a recurrent decoder; the sizes default to the Show-Attend-Tell tutorial's."""

    arch: str = "attention-gru"  # "gru" | "attention-gru"
    encoder_dim: int = 0  # width of the image tokens; set from the encoder by captioner.build_captioner
    output_ids: Optional[Tuple[int, ...]] = None  # the compact output layer's GPT-2 ids; None = all 50,257
    block_size: int = 64  # most positions, start token included
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512  # only attention-gru
    dropout: float = 0.5  # before the output layer
    attention_reg: float = 1.0  # the tutorial's alpha_c, weight of the doubly stochastic term; only attention-gru
    global_pool: str = "mean"  # the image's global vector: "mean" of its tokens, or "cls": a ViT's class token

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RNNConfig":
        return config_from_dict(cls, d, "RNN decoder")

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError("arch must be one of %s, got %r" % (", ".join(ARCHS), self.arch))
        for name in ("encoder_dim", "embed_dim", "hidden_dim", "attention_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError("%s must be a positive whole number, got %r" % (name, value))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError("block_size must be a whole number >= 2 (the start token and one more), got %r"
                             % (self.block_size,))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1), got %r" % (self.dropout,))
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError("global_pool must be one of %s, got %r" % (", ".join(GLOBAL_POOLS), self.global_pool))
        if not self.attention_reg >= 0.0:
            raise ValueError("attention_reg must be >= 0, got %r" % (self.attention_reg,))
        if self.output_ids is not None:
            OutputVocab(self.output_ids)  # raises a ValueError naming output_ids


# ----------------------------------------------------------------------------------------------- memory and state

class RNNMemory:
    """Per-image tensors, rows = images (or beams): the initial hidden state (B, H) and what every step reads,
    `features` ((B, E) projected global feature, or (B, N, D) image tokens) and `keys` ((B, N, A) or None)."""

    def __init__(self, initial_hidden: torch.Tensor, features: torch.Tensor, keys: Optional[torch.Tensor] = None):
        self.initial_hidden, self.features, self.keys = initial_hidden, features, keys

    @property
    def rows(self) -> int:
        return self.initial_hidden.shape[0]

    def _map(self, fn) -> "RNNMemory":
        return RNNMemory(fn(self.initial_hidden), fn(self.features), None if self.keys is None else fn(self.keys))

    def index_select(self, index: torch.Tensor) -> "RNNMemory":
        return self._map(lambda t: t.index_select(0, index))

    def repeat_interleave(self, repeats: int) -> "RNNMemory":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))


class RNNState:
    """The decoding state: each row's hidden state (B, H) after `length` positions (None before the first)."""

    def __init__(self, hidden: Optional[torch.Tensor] = None, length: int = 0):
        self.hidden, self.length = hidden, length

    def index_select(self, index: torch.Tensor) -> "RNNState":
        return RNNState(None if self.hidden is None else self.hidden.index_select(0, index), self.length)


# ----------------------------------------------------------------------------------------------- the decoders

class RNNDecoder(FromScratchDecoder):
    """What both archs share: the compact vocabulary, the word embedding, h0 = tanh(init_h(mean image token)), the
    output layer, the step interface and the checkpoints. Subclasses give `_memory` and `_run`."""

    arch = ""  # the subclass's RNNConfig.arch

    def __init__(self, cfg: RNNConfig):
        super().__init__()
        cfg.validate()
        if cfg.arch != self.arch:
            raise ValueError("%s builds arch %r, the config asks for %r (use build_rnn_decoder)"
                             % (type(self).__name__, self.arch, cfg.arch))
        self.cfg = cfg
        self.vocab = OutputVocab(cfg.output_ids)
        self.embedding = nn.Embedding(self.vocab.input_rows, cfg.embed_dim)
        # The tutorial's init_h is linear; the tanh keeps h0 in (-1, 1), where a GRU's hidden states always lie.
        self.init_h = nn.Linear(cfg.encoder_dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.hidden_dim, self.vocab.size)
        nn.init.uniform_(self.embedding.weight, -EMBEDDING_INIT, EMBEDDING_INIT)
        nn.init.uniform_(self.fc.weight, -EMBEDDING_INIT, EMBEDDING_INIT)
        nn.init.zeros_(self.fc.bias)

    def image_memory(self, image_tokens: torch.Tensor) -> RNNMemory:
        """Image tokens (B, N, encoder_dim) -> the per-image memory; computed once per image."""
        assert image_tokens.dim() == 3 and image_tokens.shape[-1] == self.cfg.encoder_dim, \
            "image tokens must be (B, N, %d), got %s" % (self.cfg.encoder_dim, tuple(image_tokens.shape))
        initial_hidden = torch.tanh(self.init_h(self.global_vector(image_tokens)))  # (B, H)
        features, keys = self._memory(image_tokens)
        return RNNMemory(initial_hidden, features, keys)

    def global_vector(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): the mean of the tokens (a CNN's grid: its average pool), or the first token (a ViT's
        class token, its pooled feature) with global_pool "cls"."""
        return image_tokens[:, 0] if self.cfg.global_pool == "cls" else image_tokens.mean(dim=1)

    def new_cache(self) -> RNNState:
        return RNNState()

    def forward(self, tokens: torch.Tensor, image_tokens: Optional[torch.Tensor] = None,
                memory: Optional[RNNMemory] = None, cache: Optional[RNNState] = None,
                return_attention: bool = False, positions: Optional[torch.Tensor] = None):
        """tokens (B, T) GPT-2 ids -> logits (B, T, vocab.size); with a cache, `tokens` are only the new ones and the
        cache advances in place. positions: a boolean (B, T) mask, logits (M, vocab.size) only there.
        return_attention=True also returns one block's attention over the image tokens, (B, 1, T, N), or None."""
        if memory is None:
            if image_tokens is None:
                raise ValueError("the %s decoder needs the image: pass image_tokens or memory" % self.cfg.arch)
            memory = self.image_memory(image_tokens)
        past = cache.length if cache is not None else 0
        end = past + tokens.shape[1]
        if end > self.cfg.block_size:
            raise ValueError("sequence of %d positions exceeds the decoder's block_size %d" % (end,
                                                                                              self.cfg.block_size))
        assert memory.rows == tokens.shape[0], "memory has %d rows for %d token rows" % (memory.rows,
                                                                                          tokens.shape[0])
        hidden = memory.initial_hidden if past == 0 else cache.hidden
        embeds = self.embedding(self.vocab.inputs(tokens))  # (B, T, embed_dim)
        outputs, hidden, alphas = self._run(embeds, memory, hidden)  # (B, T, H), (B, H), (B, T, N) or None
        if cache is not None:
            cache.hidden, cache.length = hidden, end
        if positions is not None:
            outputs = outputs[positions]  # (M, H)
        logits = self.fc(self.dropout(outputs))  # (B, T, V_out) or (M, V_out)
        if not return_attention:
            return logits
        return logits, [None if alphas is None else alphas.unsqueeze(1)]  # one block, one head: (B, 1, T, N)

    def _memory(self, image_tokens: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def _run(self, embeds: torch.Tensor, memory: RNNMemory, hidden: torch.Tensor):
        raise NotImplementedError

    def parameter_summary(self) -> Dict[str, int]:
        """Parameter counts per part (all trainable), plus `trainable` and `frozen` (0)."""
        parts = {part: 0 for part in PARTS.values()}  # in the order data flows through the decoder
        for name, p in self.named_parameters():
            parts[PARTS[name.split(".")[0]]] += p.numel()
        parts = {part: count for part, count in parts.items() if count}
        parts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        parts["frozen"] = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return parts


class GRUDecoder(RNNDecoder):
    """`gru`: input at step t = [embed(y_t), image_proj(global vector)]; no attention (seed §3.2.1)."""

    arch = "gru"

    def __init__(self, cfg: RNNConfig):
        super().__init__(cfg)
        self.image_proj = nn.Linear(cfg.encoder_dim, cfg.embed_dim)
        self.rnn = nn.GRU(2 * cfg.embed_dim, cfg.hidden_dim, batch_first=True)

    def _memory(self, image_tokens):
        return self.image_proj(self.global_vector(image_tokens)), None  # (B, embed_dim)

    def _run(self, embeds, memory, hidden):
        image = memory.features.unsqueeze(1).expand(-1, embeds.shape[1], -1)  # (B, T, embed_dim)
        # one call over the T new positions, whether training (all of them) or decoding (one, from the cache)
        outputs, last = self.rnn(torch.cat([embeds, image.to(embeds.dtype)], dim=2),
                                 hidden.to(embeds.dtype).unsqueeze(0).contiguous())  # (B, T, H), (1, B, H)
        return outputs, last.squeeze(0), None


class AdditiveAttention(nn.Module):
    """Show-Attend-Tell's soft attention: e_i = w^T relu(W_enc f_i + W_dec h), alpha = softmax(e) over the N image
    tokens, context = sum_i alpha_i f_i. Bahdanau's form has tanh where the tutorial (and we) have ReLU."""

    def __init__(self, encoder_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(hidden_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1, bias=False)  # a bias is the same for every token: no effect

    def forward(self, features: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor):
        """features (B, N, D), keys = encoder_att(features) (B, N, A), hidden (B, H) -> context (B, D), alpha (B, N)."""
        scores = self.full_att(F.relu(keys + self.decoder_att(hidden).unsqueeze(1))).squeeze(2)  # (B, N)
        alpha = scores.float().softmax(dim=-1)  # (B, N), float32 under autocast too
        context = (alpha.unsqueeze(2) * features).sum(dim=1)  # (B, D)
        return context, alpha


class AttentionGRUDecoder(RNNDecoder):
    """`attention-gru`: at step t, attention from h_{t-1} gives the context z_t, gated by
    beta = sigmoid(f_beta(h_{t-1})); h_t = GRUCell([embed(y_t), beta * z_t], h_{t-1}) (seed §3.2.2, Show-Attend-Tell
    with a GRU cell). Row t of the attention is the alpha of the step whose output predicts token t + 1."""

    arch = "attention-gru"

    def __init__(self, cfg: RNNConfig):
        super().__init__(cfg)
        self.attention = AdditiveAttention(cfg.encoder_dim, cfg.hidden_dim, cfg.attention_dim)
        self.f_beta = nn.Linear(cfg.hidden_dim, cfg.encoder_dim)
        self.rnn = nn.GRUCell(cfg.embed_dim + cfg.encoder_dim, cfg.hidden_dim)

    def _memory(self, image_tokens):
        return image_tokens, self.attention.encoder_att(image_tokens)  # (B, N, D), (B, N, A)

    def _run(self, embeds, memory, hidden):
        outputs: List[torch.Tensor] = []
        alphas: List[torch.Tensor] = []
        for t in range(embeds.shape[1]):
            context, alpha = self.attention(memory.features, memory.keys, hidden)  # (B, D), (B, N)
            gate = torch.sigmoid(self.f_beta(hidden))  # (B, D)
            step_input = torch.cat([embeds[:, t], (gate * context).to(embeds.dtype)], dim=1)  # (B, E + D)
            hidden = self.rnn(step_input, hidden.to(step_input.dtype))  # (B, H)
            outputs.append(hidden)
            alphas.append(alpha)
        return torch.stack(outputs, dim=1), hidden, torch.stack(alphas, dim=1)  # (B, T, H), (B, H), (B, T, N)

    def attention_penalty(self, attentions: List[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """The doubly stochastic term, attention_reg * ((1 - sum_t alpha_t) ** 2).mean(): over the real positions
        (B, T) each image token's attention should add up to about one. attentions: forward's, [(B, 1, T, N)]."""
        alpha = attentions[0][:, 0].float()  # (B, T, N)
        assert positions.shape == alpha.shape[:2], "positions %s for attention %s" % (tuple(positions.shape),
                                                                                     tuple(alpha.shape))
        total = (alpha * positions.unsqueeze(2).to(alpha.dtype)).sum(dim=1)  # (B, N)
        return self.cfg.attention_reg * ((1.0 - total) ** 2).mean()


DECODERS = {"gru": GRUDecoder, "attention-gru": AttentionGRUDecoder}


def build_rnn_decoder(cfg: RNNConfig) -> RNNDecoder:
    """The decoder of cfg.arch."""
    cfg.validate()
    return DECODERS[cfg.arch](cfg)


__all__ = ["ARCHS", "AdditiveAttention", "AttentionGRUDecoder", "GRUDecoder", "RNNConfig", "RNNDecoder", "RNNMemory",
           "RNNState", "build_rnn_decoder"]
