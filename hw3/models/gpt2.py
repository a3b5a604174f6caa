"""The course's GPT-2 text decoder, extended for captioning.

Loads GPT-2 weights (the course's `decoder_model.bin` or a Hugging Face GPT-2 file), keeps them frozen, and adds what
is trained: cross-attention from the text to the image tokens, an image projection, and parameter-efficient
fine-tuning (adapters, prefix/prompt tuning, LoRA through loralib). Without an image it is exactly GPT-2.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import loralib as lora
import torch
import torch.nn as nn
import torch.nn.functional as F

from hw3.util import safe_load
from hw3.util.config import config_from_dict
from hw3.util.errors import UserError
from hw3.models.output_vocab import OutputVocab
from hw3.data.tokenizer import END_TOKEN  # noqa: F401 (the start and end token; re-exported)

HEAD_SIZE = 64  # every GPT-2 size uses 64-wide heads, so n_head = n_embd // 64 when a weight file doesn't say
GPT2_SMALL = dict(n_layer=12, n_embd=768, vocab_size=50257, block_size=1024)
# GPT-2 stores these as Conv1D, (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS_TO_DROP = (".attn.bias", ".attn.masked_bias")
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_PLACES = ("self", "cross", "mlp")
HAS_SDPA = hasattr(F, "scaled_dot_product_attention")  # torch >= 2.0; the explicit softmax path is the fallback


class DecoderWeightsError(ValueError):
    """The decoder weight file is missing, unreadable or not GPT-2."""


@dataclass
class Config:
    """Everything that rebuilds a decoder; shape fields left as None are read from the checkpoint."""

    checkpoint: Optional[str] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    vocab_size: Optional[int] = None
    block_size: Optional[int] = None
    encoder_dim: int = 0  # width of the image tokens; 0 = no cross-attention
    cross_attn_layers: Optional[Tuple[int, ...]] = None  # None = every block
    cross_attn_gate: bool = True  # tanh(gate) with gate = 0 at start, so training starts from exact GPT-2
    image_proj: str = "linear"  # "linear" | "mlp"
    adapter_dim: int = 0  # bottleneck width; 0 = no adapters
    adapter_places: Tuple[str, ...] = ADAPTER_PLACES
    prefix_len: int = 0  # per-layer key/value prefixes (prefix tuning)
    prefix_hidden: int = 0  # > 0: prefixes come from a reparameterisation MLP of this width
    prompt_len: int = 0  # learned input embeddings before the text (prompt tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: Tuple[str, ...] = ("attn.c_attn",)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return config_from_dict(cls, d, "decoder")

    def validate(self) -> None:
        if self.image_proj not in ("linear", "mlp"):
            raise ValueError("image_proj must be 'linear' or 'mlp', got %r" % self.image_proj)
        bad = [p for p in self.adapter_places if p not in ADAPTER_PLACES]
        if bad:
            raise ValueError("adapter_places must be among %s, got %s" % (ADAPTER_PLACES, bad))
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError("lora_targets must be among %s, got %s" % (LORA_TARGETS, bad))
        if self.n_embd % self.n_head:
            raise ValueError("n_embd %d is not divisible by n_head %d" % (self.n_embd, self.n_head))
        if self.cross_attn_layers is not None:
            bad = [i for i in self.cross_attn_layers if not 0 <= i < self.n_layer]
            if bad:
                raise ValueError("cross_attn_layers %s outside 0..%d" % (bad, self.n_layer - 1))

    def has_cross_attn(self, layer: int) -> bool:
        return self.encoder_dim > 0 and (self.cross_attn_layers is None or layer in self.cross_attn_layers)


# ----------------------------------------------------------------------------------------------- weight files

def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise DecoderWeightsError("decoder weights not found: %s (pass the course's decoder_model.bin)" % path)
    try:
        return safe_load.load_tensors(path, "decoder weights", unwrap=("state_dict",))
    except UserError as err:
        raise DecoderWeightsError(str(err)) from None


def load_gpt2_weights(path: str) -> Dict[str, torch.Tensor]:
    """GPT-2 trunk weights in the course's layout (`wte.weight`, `h.0.attn.c_attn.weight`... Conv1D orientation),
    from the course file or a Hugging Face `pytorch_model.bin` / `model.safetensors`."""
    state = _read_state_dict(path)
    weights = {}
    for key, value in state.items():
        if key.startswith("transformer."):
            key = key[len("transformer."):]
        if key == "lm_head.weight" or key.endswith(BUFFERS_TO_DROP):
            continue  # the head is tied to wte; the masks are buffers we rebuild
        weights[key] = value
    for key in ("wte.weight", "wpe.weight", "ln_f.weight", "h.0.attn.c_attn.weight"):
        if key not in weights:
            raise DecoderWeightsError("%s is not a GPT-2 decoder weight file: no '%s' among its %d tensors (first keys: "
                                      "%s)" % (path, key, len(state), ", ".join(list(state)[:4])))
    return weights


def infer_shape(weights: Dict[str, torch.Tensor]) -> dict:
    n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("h."))
    vocab_size, n_embd = weights["wte.weight"].shape
    return dict(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, block_size=weights["wpe.weight"].shape[0])


# ----------------------------------------------------------------------------------------------- building blocks

def _linear(cfg: Config, name: str, n_in: int, n_out: int) -> nn.Linear:
    """nn.Linear, or its loralib version when LoRA targets this projection (c_attn: q and v only)."""
    if cfg.lora_rank <= 0 or name not in cfg.lora_targets:
        return nn.Linear(n_in, n_out)
    # merge_weights=False: loralib would otherwise merge on eval() and un-merge on train(); merging happens once, in
    # Decoder.merge_lora, where inference loads a model
    kwargs = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, merge_weights=False)
    if name == "attn.c_attn":
        return lora.MergedLinear(n_in, n_out, enable_lora=[True, False, True], **kwargs)
    return lora.Linear(n_in, n_out, **kwargs)


def _split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, H, T, hd)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, C)


def attend(q, k, v, mask: Optional[torch.Tensor] = None, causal: bool = False, return_probs: bool = False):
    """Scaled dot-product attention; the fused kernel unless the probabilities are wanted. mask: True = may attend."""
    if HAS_SDPA and not return_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None), None
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if causal and mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return probs @ v, probs


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = _linear(cfg, "attn.c_attn", cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = _linear(cfg, "attn.c_proj", cfg.n_embd, cfg.n_embd)

    def forward(self, x, past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                prefix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        q, k, v = (_split_heads(t, self.n_head) for t in self.c_attn(x).split(x.shape[-1], dim=2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        T, S, P = q.shape[2], k.shape[2], 0
        if prefix is not None:
            P = prefix[0].shape[2]
            k = torch.cat([prefix[0].expand(q.shape[0], -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([prefix[1].expand(q.shape[0], -1, -1, -1).to(v.dtype), v], dim=2)
        mask = None
        if T > 1 and (P > 0 or S > T):  # queries see every prefix slot and the text up to themselves
            mask = torch.ones(T, P + S, dtype=torch.bool, device=x.device).tril(P + S - T)
        y, _ = attend(q, k, v, mask=mask, causal=T > 1)
        return self.c_proj(_merge_heads(y)), present


class CrossAttention(nn.Module):
    """Text queries attend to the (projected) image tokens; keys and values are computed once per image."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def memory(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(image).split(image.shape[-1], dim=2)
        return _split_heads(k, self.n_head), _split_heads(v, self.n_head)  # (B, H, N, hd) each

    def forward(self, x, memory: Tuple[torch.Tensor, torch.Tensor], return_probs: bool = False):
        q = _split_heads(self.q(x), self.n_head)
        k, v = memory
        y, probs = attend(q, k.to(q.dtype), v.to(q.dtype), return_probs=return_probs)
        return self.c_proj(_merge_heads(y)), probs  # probs: (B, H, T, N) or None


class Adapter(nn.Module):
    """Houlsby bottleneck, h + up(gelu(down(h))); `up` starts at zero so the adapter starts as the identity."""

    def __init__(self, n_embd: int, dim: int):
        super().__init__()
        self.down = nn.Linear(n_embd, dim)
        self.up = nn.Linear(dim, n_embd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(F.gelu(self.down(h)))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.c_fc = _linear(cfg, "mlp.c_fc", cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = _linear(cfg, "mlp.c_proj", 4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's GELU (torch >= 1.12)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.cross_attn = CrossAttention(cfg) if cfg.has_cross_attn(layer) else None
        if self.cross_attn is not None:
            self.ln_cross = nn.LayerNorm(cfg.n_embd)
            self.cross_gate = nn.Parameter(torch.zeros(1)) if cfg.cross_attn_gate else None
        places = cfg.adapter_places if cfg.adapter_dim > 0 else ()
        self.adapters = nn.ModuleDict({  # an absent adapter is the identity (timm's way: no branches in forward)
            place: Adapter(cfg.n_embd, cfg.adapter_dim) if place in places else nn.Identity()
            for place in ADAPTER_PLACES})

    def forward(self, x, memory=None, past=None, prefix=None, return_attention: bool = False):
        h, present = self.attn(self.ln_1(x), past=past, prefix=prefix)
        x = x + self.adapters["self"](h)
        probs = None
        if self.cross_attn is not None and memory is not None:
            h, probs = self.cross_attn(self.ln_cross(x), memory, return_probs=return_attention)
            h = self.adapters["cross"](h)
            x = x + (torch.tanh(self.cross_gate) * h if self.cross_gate is not None else h)
        x = x + self.adapters["mlp"](self.mlp(self.ln_2(x)))
        return x, present, probs


class Prefix(nn.Module):
    """Trainable per-layer key/value prefixes, optionally produced by an MLP (Li & Liang's reparameterisation)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_layer, self.n_head, self.n_embd, self.length = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.prefix_len
        out = cfg.n_layer * 2 * cfg.n_embd
        if cfg.prefix_hidden > 0:
            self.embedding = nn.Parameter(torch.randn(cfg.prefix_len, cfg.n_embd) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.prefix_hidden), nn.Tanh(),
                                     nn.Linear(cfg.prefix_hidden, out))
        else:
            self.key_values = nn.Parameter(torch.randn(cfg.prefix_len, out) * 0.02)

    def forward(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        kv = self.mlp(self.embedding) if hasattr(self, "mlp") else self.key_values  # (P, n_layer * 2 * C)
        kv = kv.view(self.length, self.n_layer * 2, self.n_head, self.n_embd // self.n_head).permute(1, 2, 0, 3)
        return [(kv[2 * i].unsqueeze(0), kv[2 * i + 1].unsqueeze(0)) for i in range(self.n_layer)]  # (1, H, P, hd)


# ----------------------------------------------------------------------------------------------- caches

class ImageMemory:
    """Per-block cross-attention keys/values of a batch of images (None for blocks without cross-attention)."""

    def __init__(self, layers: List[Optional[Tuple[torch.Tensor, torch.Tensor]]]):
        self.layers = layers

    def _map(self, fn) -> "ImageMemory":
        return ImageMemory([None if kv is None else (fn(kv[0]), fn(kv[1])) for kv in self.layers])

    def index_select(self, index: torch.Tensor) -> "ImageMemory":
        return self._map(lambda t: t.index_select(0, index))

    def repeat_interleave(self, repeats: int) -> "ImageMemory":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))


class KVCache:
    """Self-attention keys/values of the tokens decoded so far, one entry per block."""

    def __init__(self, n_layer: int):
        self.layers: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * n_layer
        self.length = 0  # positions consumed, prompt-tuning slots included

    def index_select(self, index: torch.Tensor) -> "KVCache":
        out = KVCache(len(self.layers))
        out.length = self.length
        out.layers = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.layers]
        return out


# ----------------------------------------------------------------------------------------------- the decoder

class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        weights = load_gpt2_weights(cfg.checkpoint) if cfg.checkpoint else None
        cfg = self._resolve(cfg, weights)
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.vocab = OutputVocab(None, cfg.vocab_size)  # GPT-2 predicts every id: the identity map
        self.image_proj = None
        if cfg.encoder_dim > 0:
            layers = [nn.Linear(cfg.encoder_dim, cfg.n_embd)]
            if cfg.image_proj == "mlp":
                layers += [nn.GELU(), nn.Linear(cfg.n_embd, cfg.n_embd)]
            self.image_proj = nn.Sequential(*layers, nn.LayerNorm(cfg.n_embd))
        self.prefix = Prefix(cfg) if cfg.prefix_len > 0 else None
        self.prompt = nn.Parameter(torch.randn(cfg.prompt_len, cfg.n_embd) * 0.02) if cfg.prompt_len > 0 else None
        self.lora_merged = False
        self._base_names = set(self._gpt2_names())
        if weights is not None:
            self._load_base(weights, cfg.checkpoint)
        for name, param in self.named_parameters():
            param.requires_grad = name not in self._base_names

    @staticmethod
    def _resolve(cfg: Config, weights: Optional[Dict[str, torch.Tensor]]) -> Config:
        found = infer_shape(weights) if weights is not None else GPT2_SMALL
        values = {}
        for field, value in found.items():
            given = getattr(cfg, field)
            if weights is not None and given is not None and given != value:
                raise DecoderWeightsError("%s has %s=%d but the config asks for %d" % (cfg.checkpoint, field, value, given))
            values[field] = value if given is None else given
        values["n_head"] = cfg.n_head or max(1, values["n_embd"] // HEAD_SIZE)
        cfg = dataclasses.replace(cfg, **values)
        cfg.validate()
        return cfg

    def _gpt2_names(self) -> List[str]:
        names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                 "transformer.ln_f.bias"]
        for i in range(self.cfg.n_layer):
            for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                names += ["transformer.h.%d.%s.weight" % (i, part), "transformer.h.%d.%s.bias" % (i, part)]
        return names

    @torch.no_grad()
    def _load_base(self, weights: Dict[str, torch.Tensor], path: str) -> None:
        params = dict(self.named_parameters())
        expected = {name[len("transformer."):] for name in self._base_names}
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise DecoderWeightsError("%s does not match a %d-layer GPT-2: missing %s, unexpected %s" % (
                path, self.cfg.n_layer, missing[:5], unexpected[:5]))
        for key, value in weights.items():
            if key.endswith(CONV1D_WEIGHTS):
                value = value.t()
            target = params["transformer." + key]
            if target.shape != value.shape:
                raise DecoderWeightsError("%s: %s has shape %s, expected %s" % (path, key, tuple(value.shape),
                                                                               tuple(target.shape)))
            target.copy_(value.to(target.dtype))

    # ------------------------------------------------------------------------------------------- forward

    def image_memory(self, image_tokens: torch.Tensor) -> ImageMemory:
        """Cross-attention keys/values for image tokens (B, N, encoder_dim); computed once per image."""
        if self.image_proj is None:
            raise ValueError("this decoder has no cross-attention (encoder_dim=0) but was given image tokens")
        assert image_tokens.dim() == 3 and image_tokens.shape[-1] == self.cfg.encoder_dim, \
            "image tokens must be (B, N, %d), got %s" % (self.cfg.encoder_dim, tuple(image_tokens.shape))
        image = self.image_proj(image_tokens)  # (B, N, n_embd)
        return ImageMemory([None if b.cross_attn is None else b.cross_attn.memory(image) for b in self.transformer.h])

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def forward(self, tokens: torch.Tensor, image_tokens: Optional[torch.Tensor] = None,
                memory: Optional[ImageMemory] = None, cache: Optional[KVCache] = None,
                return_attention: bool = False, positions: Optional[torch.Tensor] = None):
        """tokens (B, T) -> logits (B, T, vocab); with a cache, `tokens` are only the new ones.
        return_attention=True also returns each block's cross-attention probabilities (B, H, T, N) or None.
        positions: a boolean (B, T) mask; logits (M, vocab) only where it is True (training skips the vocabulary
        projection, the largest matrix product of a small decoder, on padding)."""
        if memory is None and image_tokens is not None:
            memory = self.image_memory(image_tokens)
        past = cache.length if cache is not None else 0
        x = self.transformer.wte(tokens)  # (B, T, C)
        n_prompt = 0
        if self.prompt is not None and past == 0:
            n_prompt = self.prompt.shape[0]
            x = torch.cat([self.prompt.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        end = past + x.shape[1]
        if end > self.cfg.block_size:
            raise ValueError("sequence of %d positions exceeds the decoder's block_size %d" % (end,
                                                                                              self.cfg.block_size))
        x = x + self.transformer.wpe(torch.arange(past, end, device=tokens.device))
        prefixes = self.prefix() if self.prefix is not None else [None] * self.cfg.n_layer
        attentions = []
        for i, block in enumerate(self.transformer.h):
            x, present, probs = block(x, memory.layers[i] if memory is not None else None,
                                      past=cache.layers[i] if cache is not None else None,
                                      prefix=prefixes[i], return_attention=return_attention)
            if cache is not None:
                cache.layers[i] = present
            attentions.append(probs[:, :, n_prompt:] if probs is not None else None)
        if cache is not None:
            cache.length = end
        x = x[:, n_prompt:]
        if positions is not None:
            x = x[positions]  # (M, C)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab) or (M, vocab)
        return (logits, attentions) if return_attention else logits

    # ------------------------------------------------------------------------------------------- checkpoints

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trained tensors: what a PEFT checkpoint holds (the course counts parameters from this file)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Loads trained tensors on top of the frozen GPT-2 (strict about the trained names and shapes)."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError("checkpoint does not fit this decoder config: missing %s, unexpected %s" % (
                missing[:6], unexpected[:6]))
        if self.lora_merged:
            raise ValueError("LoRA is merged into the frozen weights; load trained tensors before merge_lora()")
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise ValueError("checkpoint tensor %s has shape %s, the config gives %s" % (
                        name, tuple(value.shape), tuple(params[name].shape)))
                params[name].copy_(value)

    def merge_lora(self) -> int:
        """For inference: adds each LoRA update B @ A * scale into its frozen weight once (loralib's own merge), so
        decoding runs plain linear layers. Training never merges. Returns the number of merged layers."""
        layers = [m for m in self.modules() if isinstance(m, lora.LoRALayer) and not m.merged]
        for layer in layers:
            layer.merge_weights = True
            layer.train(False)  # loralib merges on the switch to eval when merge_weights is set
            layer.merge_weights = False  # and never un-merges on a later train()
        self.lora_merged = self.lora_merged or bool(layers)
        return len(layers)

    @property
    def max_text_len(self) -> int:
        """Positions left for text (start token included) after the prompt-tuning slots."""
        return self.cfg.block_size - self.cfg.prompt_len

    def parameter_summary(self) -> Dict[str, int]:
        """Trainable parameter counts per part (plus `frozen` and `trainable` totals)."""
        parts = dict(cross_attn=0, image_proj=0, adapter=0, prefix=0, prompt=0, lora=0, other=0)
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = ("lora" if "lora_" in name else "adapter" if ".adapters." in name
                    else "cross_attn" if ("cross" in name) else "image_proj" if name.startswith("image_proj")
                    else "prefix" if name.startswith("prefix") else "prompt" if name == "prompt" else "other")
            parts[part] += p.numel()
        parts = {k: v for k, v in parts.items() if v}
        parts["trainable"] = count_parameters(self, trainable_only=True)
        parts["frozen"] = count_parameters(self, trainable_only=False) - parts["trainable"]
        return parts


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def peft_config(method: str, **overrides) -> dict:
    """Recommended settings of each PEFT method, as Config fields (`none` trains cross-attention only)."""
    presets = {
        "none": {},
        "adapter": dict(adapter_dim=64, adapter_places=ADAPTER_PLACES),
        "prefix": dict(prefix_len=10, prefix_hidden=128),
        "prompt": dict(prompt_len=10),
        "lora": dict(lora_rank=16, lora_alpha=32.0, lora_targets=LORA_TARGETS),
    }
    if method not in presets:
        raise ValueError("unknown PEFT method %r (choose from %s)" % (method, ", ".join(presets)))
    out = dict(presets[method])
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


__all__ = ["Config", "Decoder", "DecoderWeightsError", "ImageMemory", "KVCache", "END_TOKEN", "count_parameters",
           "load_gpt2_weights", "peft_config"]
