"""Tiny models for tests: random GPT-2s in the course's decoder_model.bin format, tiny encoder specs, and a
trained-looking set of cross-attention weights (captioning tests use them through conftest's captioning_world)."""
from __future__ import annotations

import torch

# A 1-block ViT on 32x32 images with 8x8 patches: a 4x4 grid plus CLS, 192 wide, random weights (seeded).
TINY_ENCODER = "timm:vit_tiny_patch16_224@none?depth=1&img_size=32&patch_size=8"
# The captioning tests' encoder: 2 blocks, 32 wide, the same 4x4 grid.
CAPTION_ENCODER = "timm:vit_tiny_patch16_224@none?img_size=32&patch_size=8&depth=2&embed_dim=32&num_heads=2"
CAPTION_GPT2 = dict(n_layer=2, n_embd=128, n_head=2, vocab_size=50257, n_positions=64)
END_TOKEN = 50256


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


def ending_gpt2(seed: int = 0, end_ramp: float = 0.3, **shape):
    """A random transformers GPT-2 whose end-token logit grows with the position, so captions end after ~10 tokens."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**dict(CAPTION_GPT2, **shape), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        end = model.transformer.wte.weight[END_TOKEN]
        positions = torch.arange(config.n_positions, dtype=torch.float32).unsqueeze(1)
        model.transformer.wpe.weight.add_(end_ramp * (positions - 6) * end / end.norm())
    return model


def randomize_trainable(decoder, seed: int = 0, end_push: float = 2.0) -> None:
    """Trained-looking cross-attention: open gates, weights large enough that each image changes its caption, and
    an image-dependent push along the end token's embedding so that captions end at different steps."""
    g = torch.Generator().manual_seed(seed)
    end = decoder.transformer.wte.weight[END_TOKEN].detach()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith("cross_gate"):
                p.fill_(2.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() == 1 else 0.2))
        for block in decoder.transformer.h:
            direction = torch.randn(decoder.cfg.n_embd, generator=g)
            block.cross_attn.c_proj.weight.add_(end_push * torch.outer(end / end.norm(), direction / direction.norm()))


def open_clip_tokens(visual, images) -> torch.Tensor:
    """The reference: every token of an open_clip visual tower after ln_post, caught by a hook on its transformer
    (open_clip's own output_tokens drops the CLS token)."""
    caught = []
    handle = visual.transformer.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        visual(images)
    finally:
        handle.remove()
    x = caught[0] if getattr(visual.transformer, "batch_first", True) else caught[0].permute(1, 0, 2)
    return visual.ln_post(x)


class Uncached:
    """The decoder's cache interface with full recomputation: the 'cache' holds the tokens so far, the 'memory' the
    raw image tokens, and every call runs the whole sequence again."""

    class Tokens:
        def __init__(self, tokens=None):
            self.tokens = tokens

        def index_select(self, index):
            return Uncached.Tokens(None if self.tokens is None else self.tokens.index_select(0, index))

        def repeat_interleave(self, k):
            return Uncached.Tokens(self.tokens.repeat_interleave(k, dim=0))

    def __init__(self, decoder):
        self.decoder, self.max_text_len, self.training, self.vocab = decoder, decoder.max_text_len, False, decoder.vocab

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def image_memory(self, feats):
        return Uncached.Tokens(feats)

    def new_cache(self):
        return Uncached.Tokens()

    def __call__(self, tokens, memory, cache):
        cache.tokens = tokens if cache.tokens is None else torch.cat([cache.tokens, tokens], dim=1)
        return self.decoder(cache.tokens, image_tokens=memory.tokens)[:, -tokens.shape[1]:]


# Tiny configs of the compare stage's runs (stages.compare.COMPARE_RUNS): a short run takes seconds on one thread.
TINY_COMPARE = {"gru": dict(embed_dim=32, hidden_dim=64), "attention-gru": dict(embed_dim=32, hidden_dim=64,
                                                                                 attention_dim=32),
                "attention-gru_reg0": dict(embed_dim=32, hidden_dim=64, attention_dim=32),
                "transformer": dict(n_layer=1, n_head=2, n_embd=64)}
