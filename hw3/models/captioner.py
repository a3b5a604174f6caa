"""The captioning model: a frozen image encoder (encoder.py) and a decoder with its trained parts, plus the checkpoints
that rebuild it.

Training calls `Captioner.forward`; inference, validation and P3 call `Captioner.generate` (search.py). A checkpoint
is NAME.pt, only the trained tensors (the course counts parameters from this file), and NAME.json, the encoder spec,
the architecture and the decoder config that rebuild exactly the model that was trained.

The decoder is one of registry.ARCHITECTURES (`p2_train.py --arch`), all behind the step interface of docs/DECODERS.md:
`gpt2`, the course's frozen GPT-2 with PEFT (gpt2.py), or a decoder trained from scratch: `gru`, `attention-gru`
(rnn_decoder.py), `transformer` (transformer_decoder.py).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hw3.util import safe_load
from hw3.models import search
from hw3.models.decoding import DEFAULT_DECODING, DecodingSettings
from hw3.util.errors import UserError
from hw3.util.files import atomic_write, read_json, write_json
from hw3.models.gpt2 import Decoder, DecoderWeightsError
from hw3.models.encoder import EncoderSpec, ImageEncoder, as_spec, check_encoder_weights
from hw3.models.registry import ARCHITECTURES, DEFAULT, arch_of, decoder_from_config

CHECKPOINT_FORMAT = "hw3-captioner/1"


class Captioner(nn.Module):
    """Frozen image encoder + decoder; only the decoder's trainable tensors are ever trained or saved."""

    def __init__(self, encoder: ImageEncoder, decoder: Decoder):
        super().__init__()
        if decoder.cfg.encoder_dim != encoder.width:
            raise UserError("decoder expects %d-wide image tokens but encoder %s gives %d" % (
                decoder.cfg.encoder_dim, encoder.spec, encoder.width))
        self.encoder: Optional[ImageEncoder] = encoder
        self.encoder_spec: EncoderSpec = encoder.spec
        self.decoder = decoder

    def train(self, mode: bool = True) -> "Captioner":
        super().train(mode)
        if self.encoder is not None:
            self.encoder.train(False)
        return self

    def release_encoder(self) -> None:
        """Drops the encoder's weights once image tokens come from a feature cache (training never runs it then)."""
        self.encoder = None

    @torch.no_grad()
    def image_tokens(self, visual: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the frozen encoder's tokens (B, N, width); tokens from a feature cache (fp16)
        pass through as fp32."""
        if visual.dim() == 3:
            return visual.float()
        if self.encoder is None:
            raise RuntimeError("the encoder was released (feature-cache training) but images were given")
        return self.encoder(visual)

    @property
    def arch(self) -> str:
        return arch_of(self.decoder.cfg)

    def forward(self, visual: torch.Tensor, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                return_attention: bool = False):
        """(images or cached image tokens, tokens (B, T)) -> logits (B, T, vocab), or (M, vocab) at the True entries
        of `positions` (B, T): training skips the vocabulary projection on padding. return_attention=True also
        returns the per-block attention (attention-gru's doubly stochastic term needs it)."""
        return self.decoder(tokens, image_tokens=self.image_tokens(visual), positions=positions,
                            return_attention=return_attention)

    def generate(self, visual: torch.Tensor, settings: DecodingSettings = DEFAULT_DECODING, **options):
        """Caption ids for images or image tokens; options as search.generate's (return_attention=True for P3)."""
        return search.generate(self.decoder, self.image_tokens(visual), settings, **options)

    def attention_maps(self, per_block: Sequence[Optional[torch.Tensor]], layer: str = "last",
                       heads: str = "mean") -> torch.Tensor:
        """One caption's per-block (n_head, L, N) cross-attention (generate(..., return_attention=True)) -> (L, h, w)
        maps over the encoder's patch grid, CLS/register tokens dropped.

        layer: "last" (the last block with cross-attention), "mean" (mean over those blocks) or a block index;
        heads: "mean", "max" or a head index."""
        blocks = [(i, a) for i, a in enumerate(per_block) if a is not None]
        if not blocks:
            raise UserError(no_attention_reason(self.arch))
        if layer == "last":
            chosen = blocks[-1][1]
        elif layer == "mean":
            chosen = torch.stack([a for _, a in blocks]).mean(0)
        else:
            index = int(layer)
            if not -len(per_block) <= index < len(per_block):
                raise UserError("--layer %s: the decoder has blocks 0..%d" % (layer, len(per_block) - 1))
            if per_block[index] is None:
                raise UserError("--layer %s: block %d has no cross-attention (blocks with it: %s)" % (
                    layer, index % len(per_block), [i for i, _ in blocks]))
            chosen = per_block[index]
        if heads in ("mean", "max"):
            attention = chosen.mean(0) if heads == "mean" else chosen.max(0).values  # (L, N)
        else:
            head = int(heads)
            if not -chosen.shape[0] <= head < chosen.shape[0]:
                raise UserError("--heads %s: the decoder has %d heads" % (heads, chosen.shape[0]))
            attention = chosen[head]
        h, w = self.encoder.grid_size
        prefix = self.encoder.num_prefix_tokens
        if attention.shape[-1] != prefix + h * w:
            raise ValueError("attention covers %d image tokens, but the encoder has %d prefix tokens + a %dx%d grid"
                             % (attention.shape[-1], prefix, h, w))
        return attention[:, prefix:].reshape(-1, h, w)

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.decoder.trainable_state_dict()


def no_attention_reason(arch: str) -> str:
    """Why a decoder has no attention map over the image (P3 and the pointing game refuse it in this line)."""
    reason = ARCHITECTURES[arch].no_attention if arch in ARCHITECTURES else None
    if reason:
        return "--arch %s has no attention map: %s" % (arch, reason)
    return "the decoder has no cross-attention, so there is no attention over the image to draw"


def build_captioner(encoder_spec, decoder_config, offline: Optional[bool] = None) -> Captioner:
    """A fresh captioner of the config's architecture; the config's encoder_dim is set from the encoder."""
    encoder = ImageEncoder(encoder_spec, offline=offline)
    if getattr(decoder_config, "global_pool", None) == "cls" and not encoder.num_prefix_tokens:
        raise UserError("--global-pool cls takes a ViT's class token, but encoder %s has none (use mean)" % encoder.spec)
    cfg = dataclasses.replace(decoder_config, encoder_dim=encoder.width)
    try:
        decoder = decoder_from_config(cfg)
    except (DecoderWeightsError, ValueError) as err:
        raise UserError(str(err)) from None
    return Captioner(encoder, decoder)


# ----------------------------------------------------------------------------------------------- checkpoints

def config_path(checkpoint: str) -> str:
    """checkpoints/p2_best.pt -> checkpoints/p2_best.json: the model configuration saved beside the tensors."""
    return os.path.splitext(checkpoint)[0] + ".json"


def save_checkpoint(path: str, captioner: Captioner, extra: Optional[dict] = None) -> None:
    """Writes only the trainable tensors (a flat dict) and, beside it, the JSON that rebuilds the model. `extra`
    (epoch, scores, recommended decoding under decoding.INFERENCE_KEY...) goes in the JSON too."""
    state = {k: v.detach().cpu().contiguous() for k, v in captioner.trainable_state_dict().items()}
    decoder_config = captioner.decoder.cfg.to_dict()
    decoder_config.pop("checkpoint", None)  # the decoder weights are an inference argument, not part of the model
    meta = dict(format=CHECKPOINT_FORMAT, encoder=captioner.encoder_spec.to_json(), arch=captioner.arch,
                decoder=decoder_config,
                trainable_parameters=sum(v.numel() for v in state.values()),
                tensors={k: list(v.shape) for k, v in state.items()})
    meta.update(extra or {})
    with atomic_write(path, "wb", what="a checkpoint") as f:
        torch.save(state, f)
    write_json(config_path(path), meta)


def read_checkpoint_config(checkpoint: str) -> dict:
    if not os.path.isfile(checkpoint):
        raise UserError("checkpoint not found: %s (run `bash hw3_download.sh`, or pass --checkpoint)" % checkpoint)
    path = config_path(checkpoint)
    meta = read_json(path, "checkpoint config (saved beside %s)" % os.path.basename(checkpoint))
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or not isinstance(
            meta.get("decoder"), dict) or not isinstance(meta.get("encoder"), (str, dict)):
        raise UserError("%s is not a captioner config (expected format %r with 'encoder' and 'decoder')" % (
            path, CHECKPOINT_FORMAT))
    if meta.setdefault("arch", DEFAULT) not in ARCHITECTURES:
        raise UserError("%s: unknown arch %r (this code knows %s)" % (path, meta["arch"], ", ".join(ARCHITECTURES)))
    return meta


def _check_tensors(checkpoint: str, state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = ["%s %s (config gives %s)" % (k, tuple(state[k].shape), tuple(expected[k].shape))
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if names:
            problems.append("%d %s: %s%s" % (len(names), what, ", ".join(names[:3]), " ..." if len(names) > 3 else ""))
    if problems:
        raise UserError("checkpoint %s does not match its config %s: %s" % (
            checkpoint, config_path(checkpoint), "; ".join(problems)))


def _decoder_config(checkpoint: str, meta: dict, decoder_weights: str):
    """The saved decoder config of the checkpoint's arch (a decoder with GPT-2 weights reads them from
    `decoder_weights`), checked to be one its row describes."""
    row = ARCHITECTURES[meta["arch"]]
    fields = meta["decoder"] if row.from_scratch else dict(meta["decoder"], checkpoint=decoder_weights)
    try:
        cfg = row.config_class.from_dict(fields)
        if row.from_scratch:
            cfg.validate()
    except (TypeError, ValueError) as err:
        raise UserError("%s: bad decoder config: %s" % (config_path(checkpoint), err)) from None
    if not row.describes(cfg):
        said = [repr(name) for name, other in ARCHITECTURES.items() if other.describes(cfg)] or ["another arch"]
        raise UserError("%s: arch %r but its decoder config says %s" % (config_path(checkpoint), meta["arch"], said[0]))
    return cfg


def load_captioner(checkpoint: str, decoder_weights: str, device="cpu", offline: Optional[bool] = None,
                   encoder_spec=None) -> Tuple[Captioner, dict]:
    """The trained captioner, ready for inference: encoder from the saved spec (or `encoder_spec`, e.g. a local
    weight file), frozen GPT-2 from `decoder_weights` (a from-scratch decoder needs none and ignores it), trained
    tensors from `checkpoint`, LoRA merged into the frozen weights (decoder.merge_lora). Returns (captioner in eval
    mode, its config)."""
    meta = read_checkpoint_config(checkpoint)
    state = safe_load.load_tensors(checkpoint, "checkpoint")
    spec = as_spec(encoder_spec) if encoder_spec else EncoderSpec.from_json(meta["encoder"]).from_repo_root()
    check_encoder_weights(spec, offline)  # fail before the slow builds
    cfg = _decoder_config(checkpoint, meta, decoder_weights)
    try:
        decoder = decoder_from_config(cfg)
    except DecoderWeightsError as err:
        raise UserError("decoder weights %s: %s" % (decoder_weights, err)) from None
    except ValueError as err:
        raise UserError("%s: bad decoder config: %s" % (config_path(checkpoint), err)) from None
    _check_tensors(checkpoint, state, {k: v for k, v in decoder.named_parameters() if v.requires_grad})
    decoder.load_trainable_state_dict(state)
    decoder.merge_lora()
    captioner = Captioner(ImageEncoder(spec, offline=offline), decoder).to(device).eval()
    return captioner, meta


__all__ = ["CHECKPOINT_FORMAT", "Captioner", "build_captioner", "config_path", "load_captioner", "no_attention_reason",
           "read_checkpoint_config", "save_checkpoint"]
