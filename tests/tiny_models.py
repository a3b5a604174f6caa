"""Tiny models for tests: a random GPT-2 in the course's decoder_model.bin format, and tiny encoder specs."""
from __future__ import annotations

import torch

# A 1-block ViT on 32x32 images with 8x8 patches: a 4x4 grid plus CLS, 192 wide, random weights (seeded).
TINY_ENCODER = "timm:vit_tiny_patch16_224@none?depth=1&img_size=32&patch_size=8"


def save_course_format(model, path) -> str:
    """A transformers GPT2LMHeadModel as the course's decoder_model.bin: the trunk's state dict, Conv1D layout, with
    GPT-2's causal-mask buffers as the course file carries them."""
    state = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state["h.%d.attn.bias" % i] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    torch.save(state, path)
    return str(path)


def tiny_gpt2(path, n_layer: int = 2, n_embd: int = 64, n_head: int = 1, n_positions: int = 64, seed: int = 0) -> str:
    """Writes a random tiny GPT-2 (full 50257 vocabulary) in the course format; returns the path."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)
    return save_course_format(transformers.GPT2LMHeadModel(config), path)
