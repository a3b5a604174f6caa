"""A tiny CLIP in OpenAI's clip format: clip.model.build_model infers the architecture back from its state dict."""
from __future__ import annotations

import warnings

import torch

from hw3.models import clip_backend

# build_model's rules: text heads = width // 64, vision heads = width // 64, the vocabulary is the BPE tokenizer's.
TINY = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
            context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)


def tiny_openai_clip(seed: int = 0):
    """A random tiny clip.model.CLIP in eval mode whose weights survive build_model's fp16 round trip exactly
    (OpenAI's released weights are fp16)."""
    clip = clip_backend._openai_clip()
    torch.manual_seed(seed)
    model = clip.model.CLIP(**TINY)
    clip.model.convert_weights(model)
    return model.float().eval()


def save_state_dict(model, path: str) -> str:
    torch.save(model.state_dict(), path)
    return path


def save_torchscript(model, path: str) -> str:
    """A TorchScript archive like OpenAI's released files (traced here; theirs are traced too)."""
    images = torch.zeros(1, 3, TINY["image_resolution"], TINY["image_resolution"])
    tokens = torch.zeros(1, TINY["context_length"], dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and torch 2.x deprecation warnings
        traced = torch.jit.trace(model, (images, tokens), check_trace=False)
        torch.jit.save(traced, path)
    return path
