"""The captioner's decoder architectures, one row each in ARCHITECTURES (`p2_train.py --arch`).

Adding an architecture is a decoder module implementing docs/DECODERS.md and one row here. From the rows come
p2_train.py's --arch choices and each architecture's flags, the refusal of another architecture's flags, the decoder
config built from the parsed flags (and the flags that rebuild a checkpoint's config), the checkpoint JSON's "arch"
and the config class that reads it back, and the interface tests' enrolment (tests/unit/models/test_architectures.py).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from hw3.util.config import flag_name
from hw3.util.errors import UserError
from hw3.models.gpt2 import Config, Decoder, peft_config
from hw3.models.rnn_decoder import GLOBAL_POOLS, AttentionGRUDecoder, GRUDecoder, RNNConfig
from hw3.models.transformer_decoder import IMAGE_PROJECTIONS, TransformerConfig, TransformerDecoder

DEFAULT = "gpt2"  # --arch's default, and the arch of a checkpoint JSON saved before there were others
# A from-scratch config's caption length while only the options are checked (the training captions set the real one).
PLACEHOLDER_CAPTION_TOKENS = 8


@dataclass(frozen=True)
class Option:
    """A command-line option of one or more architectures. `dest` is its argparse destination and, for a from-scratch
    decoder, the config field it sets; None (or False for a switch) means not given."""

    dest: str
    help: str
    type: Optional[Callable] = None
    choices: Optional[Tuple[str, ...]] = None
    switch: bool = False  # a store_true flag

    @property
    def flag(self) -> str:
        return flag_name(self.dest)

    def add_to(self, group) -> None:
        if self.switch:
            group.add_argument(self.flag, action="store_true", help=self.help)
        else:
            group.add_argument(self.flag, type=self.type, choices=self.choices, help=self.help)

    def given(self, args: argparse.Namespace) -> bool:
        value = getattr(args, self.dest)
        return value is not None and value is not False  # 0 is given, False (a switch left off) not


# ----------------------------------------------------------------------------------------------- from scratch

def scratch_config(row: "Architecture", args: argparse.Namespace, output_ids):
    """A from-scratch decoder's config: the row's options as given over the config's defaults, the caption length of
    --max-caption-tokens (+ the start and end tokens) and the compact output layer `output_ids`."""
    given = {o.dest: getattr(args, o.dest) for o in row.options if getattr(args, o.dest) is not None}
    tokens = args.max_caption_tokens or PLACEHOLDER_CAPTION_TOKENS
    cfg = row.config_class(output_ids=output_ids, block_size=tokens + 2, **row.preset, **given)
    try:
        dataclasses.replace(cfg, encoder_dim=1).validate()  # the encoder's width is set when the model is built
    except ValueError as err:
        raise UserError("--arch %s: %s" % (row.name, err)) from None
    return cfg


def scratch_options(row: "Architecture", cfg: dict) -> Dict[str, Any]:
    """The options of a from-scratch decoder's saved config: its caption length (+ the start and end tokens in
    block_size) and its own options."""
    return dict(max_caption_tokens=cfg["block_size"] - 2, **_options_of(cfg, [o.dest for o in row.options]))


def _options_of(cfg: dict, dests: Sequence[str]) -> Dict[str, Any]:
    return {dest: cfg[dest] for dest in dests if cfg.get(dest) is not None}


@dataclass(frozen=True)
class Architecture:
    """One --arch: its config dataclass and the decoder module built from it, and what p2_train.py offers for it."""

    name: str
    config_class: type
    builder: Callable  # config -> decoder module (docs/DECODERS.md)
    from_scratch: bool  # trained whole: a compact output layer of the training captions' ids, no GPT-2 weights
    options: Tuple[Option, ...]  # its own flags; with another --arch they are refused
    summary: str = ""  # what --arch's help says of it
    preset: Dict[str, object] = field(default_factory=dict)  # config fields the row fixes (two rows, one class)
    no_attention: Optional[str] = None  # why it has no attention map over the image (P3 refuses it before loading)
    configure: Callable = scratch_config  # (row, parsed args, output_ids) -> config
    options_of_config: Callable = scratch_options  # (row, saved config dict) -> the options that rebuild it

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(o.dest for o in self.options)

    def describes(self, cfg) -> bool:
        return type(cfg) is self.config_class and all(getattr(cfg, k) == v for k, v in self.preset.items())


# ----------------------------------------------------------------------------------------------- gpt2 and its PEFT

PEFT_METHODS = ("adapter", "prefix", "lora", "prompt", "none")
# Each PEFT method's own options: given with another --peft, they would be silently ignored, so they are refused.
PEFT_OPTIONS = {"adapter": ("adapter_dim", "adapter_places"), "prefix": ("prefix_len", "prefix_hidden"),
                "prompt": ("prompt_len",), "lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
PEFT_SIZES = {"adapter_dim": 1, "prefix_len": 1, "prompt_len": 1, "lora_rank": 1, "prefix_hidden": 0}  # least value


def _preset(method: str, name: str) -> str:
    value = peft_config(method).get(name, getattr(Config(), name))
    return ",".join(value) if isinstance(value, tuple) else str(value)


IMAGE_PROJ = Option("image_proj", "image token projection (gpt2 and transformer; default linear)",
                    choices=IMAGE_PROJECTIONS)
GPT2_OPTIONS = (
    Option("decoder_weights", "the course's decoder_model.bin (frozen GPT-2; --arch gpt2 only, needed)"),
    Option("peft", "PEFT method (none = cross-attention only; default lora)", choices=PEFT_METHODS),
    Option("adapter_dim", "adapter bottleneck width (preset %s)" % _preset("adapter", "adapter_dim"), int),
    Option("adapter_places", "comma list of self,cross,mlp (preset %s)" % _preset("adapter", "adapter_places")),
    Option("prefix_len", "prefix tuning: prefix length (preset %s)" % _preset("prefix", "prefix_len"), int),
    Option("prefix_hidden", "prefix tuning: reparameterisation MLP width, 0 = none (preset %s)"
           % _preset("prefix", "prefix_hidden"), int),
    Option("prompt_len", "prompt tuning: number of learned input embeddings (preset %s)"
           % _preset("prompt", "prompt_len"), int),
    Option("lora_rank", "LoRA rank (preset %s)" % _preset("lora", "lora_rank"), int),
    Option("lora_alpha", "LoRA alpha (preset %s)" % _preset("lora", "lora_alpha"), float),
    Option("lora_dropout", "LoRA dropout (preset %s)" % _preset("lora", "lora_dropout"), float),
    Option("lora_targets", "comma list of attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj (preset %s)"
           % _preset("lora", "lora_targets")),
    Option("cross_attn_layers", "comma list of decoder blocks with cross-attention (default every)"),
    IMAGE_PROJ,
    Option("no_cross_attn_gate", "no tanh gate (at 0) on cross-attention", switch=True),
)


def _csv(text: Optional[str], cast=str):
    return None if text is None else tuple(cast(t.strip()) for t in text.split(",") if t.strip())


def gpt2_config(row: Architecture, args: argparse.Namespace, output_ids=None) -> Config:
    """The frozen GPT-2's config: --peft (default lora, written back to args, so args.json records it) with its
    preset under the given PEFT options, and the cross-attention options."""
    if not args.decoder_weights:
        raise UserError("--arch gpt2 needs --decoder-weights (the course's decoder_model.bin)")
    args.peft = args.peft or "lora"
    peft = peft_config(args.peft, adapter_dim=args.adapter_dim, adapter_places=_csv(args.adapter_places),
                       prefix_len=args.prefix_len, prefix_hidden=args.prefix_hidden, prompt_len=args.prompt_len,
                       lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                       lora_targets=_csv(args.lora_targets))
    try:
        layers = _csv(args.cross_attn_layers, int)
    except ValueError:
        raise UserError("--cross-attn-layers must be a comma list of block numbers, got %r" % args.cross_attn_layers)
    cfg = Config(checkpoint=args.decoder_weights, cross_attn_layers=layers, image_proj=args.image_proj or "linear",
                 cross_attn_gate=not args.no_cross_attn_gate, **peft)
    _check_peft(args, cfg)
    return cfg


def _check_peft(args: argparse.Namespace, cfg: Config) -> None:
    for method, options in PEFT_OPTIONS.items():
        given = [flag_name(o) for o in options if getattr(args, o) is not None]
        if given and method != args.peft:
            raise UserError("%s belong%s to --peft %s, not --peft %s" % (
                " and ".join(given), "s" if len(given) == 1 else "", method, args.peft))
    for option, least in PEFT_SIZES.items():
        if option in PEFT_OPTIONS.get(args.peft, ()) and getattr(cfg, option) < least:
            raise UserError("--%s must be at least %d for --peft %s, got %s" % (
                flag_name(option)[2:], least, args.peft, getattr(cfg, option)))
    if args.peft == "lora" and not (cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1):
        raise UserError("--lora-alpha must be above 0 and --lora-dropout in [0, 1), got %s and %s"
                        % (cfg.lora_alpha, cfg.lora_dropout))
    for option in PEFT_OPTIONS.get(args.peft, ()):
        if option in ("adapter_places", "lora_targets") and not getattr(cfg, option):
            raise UserError("%s lists nothing" % flag_name(option))


def gpt2_options(row: Architecture, cfg: dict) -> Dict[str, Any]:
    """The PEFT method a saved config uses and its options, the cross-attention options; never decoder_weights."""
    method = next((m for m, options in PEFT_OPTIONS.items() if cfg.get(options[0])), None)
    if method is None:
        raise UserError("the checkpoint's decoder config has no PEFT method (%s)" % ", ".join(PEFT_OPTIONS))
    options = dict(peft=method, no_cross_attn_gate=not cfg.get("cross_attn_gate", True))
    return dict(options, **_options_of(cfg, ("cross_attn_layers", "image_proj") + PEFT_OPTIONS[method]))


# ----------------------------------------------------------------------------------------------- the rows

EMBED_DIM = Option("embed_dim", "gru, attention-gru: word embedding width (default %d)" % RNNConfig.embed_dim, int)
HIDDEN_DIM = Option("hidden_dim", "gru, attention-gru: hidden state width (default %d)" % RNNConfig.hidden_dim, int)
ATTENTION_DIM = Option("attention_dim", "attention-gru: additive attention width (default %d)"
                       % RNNConfig.attention_dim, int)
ATTENTION_REG = Option("attention_reg", "attention-gru: weight of the doubly stochastic attention term (1 - sum_t "
                       "alpha)^2, Show-Attend-Tell's alpha_c (default %s; 0 = off)" % RNNConfig.attention_reg, float)
GLOBAL_POOL = Option("global_pool", "gru, attention-gru: the image's global vector (the gru's input, both's first "
                     "hidden state): mean of the tokens (default), or cls, a ViT's class token", choices=GLOBAL_POOLS)
DROPOUT = Option("dropout", "gru, attention-gru (default %s), transformer (default %s): dropout"
                 % (RNNConfig.dropout, TransformerConfig.dropout), float)
N_LAYER = Option("n_layer", "transformer: blocks (default %d)" % TransformerConfig.n_layer, int)
N_HEAD = Option("n_head", "transformer: attention heads (default %d)" % TransformerConfig.n_head, int)
N_EMBD = Option("n_embd", "transformer: width (default %d)" % TransformerConfig.n_embd, int)

# --arch name -> its row, in the order of --arch's choices.
ARCHITECTURES: Dict[str, Architecture] = {row.name: row for row in (
    Architecture("gpt2", Config, Decoder, from_scratch=False, options=GPT2_OPTIONS,
                 summary="the course's frozen GPT-2 with PEFT", configure=gpt2_config, options_of_config=gpt2_options),
    Architecture("gru", RNNConfig, GRUDecoder, from_scratch=True, preset=dict(arch="gru"),
                 options=(EMBED_DIM, HIDDEN_DIM, DROPOUT, GLOBAL_POOL), summary="a global image vector",
                 no_attention="it sees one global image vector (the mean of the image tokens), not the patches; use an "
                              "attention-gru, transformer or gpt2 checkpoint"),
    Architecture("attention-gru", RNNConfig, AttentionGRUDecoder, from_scratch=True, preset=dict(arch="attention-gru"),
                 options=(EMBED_DIM, HIDDEN_DIM, ATTENTION_DIM, ATTENTION_REG, DROPOUT, GLOBAL_POOL),
                 summary="Show-Attend-Tell over the image tokens"),
    Architecture("transformer", TransformerConfig, TransformerDecoder, from_scratch=True,
                 options=(N_LAYER, N_HEAD, N_EMBD, DROPOUT, IMAGE_PROJ)),
)}


# ----------------------------------------------------------------------------------------------- lookups

def trained_from_scratch() -> Tuple[str, ...]:
    """The architectures trained whole (no GPT-2 weights, a compact output layer)."""
    return tuple(name for name, row in ARCHITECTURES.items() if row.from_scratch)


def arch_of(cfg) -> str:
    """The --arch name of a decoder config; ValueError for a config no row describes."""
    for name, row in ARCHITECTURES.items():
        if row.describes(cfg):
            return name
    raise ValueError("no architecture has a %s like %s" % (type(cfg).__name__, cfg))


def decoder_from_config(cfg):
    """The decoder a config describes (GPT-2 loads its frozen weights from cfg.checkpoint)."""
    return ARCHITECTURES[arch_of(cfg)].builder(cfg)


# ----------------------------------------------------------------------------------------------- p2_train's options

def add_arguments(parser: argparse.ArgumentParser, group) -> None:
    """--arch and the options of the architectures with GPT-2 weights into `group`; then a group of the from-scratch
    decoders' options. Each option once, however many rows take it."""
    group.add_argument("--arch", choices=tuple(ARCHITECTURES), default=DEFAULT, help=_arch_help())
    scratch_group = parser.add_argument_group(
        "from-scratch decoders (--arch %s); the caption length is --max-caption-tokens, the output layer the GPT-2 ids "
        "of the training captions" % ", ".join(trained_from_scratch()))
    added = set()
    for scratch, target in ((False, group), (True, scratch_group)):
        for row in ARCHITECTURES.values():
            if row.from_scratch != scratch:
                continue
            for option in row.options:
                if option.dest not in added:
                    option.add_to(target)
                    added.add(option.dest)


def _arch_help() -> str:
    def named(name: str, row: Architecture) -> str:
        notes = [note for note in (row.summary, "default" if name == DEFAULT else "") if note]
        return "%s (%s)" % (name, ", ".join(notes)) if notes else name

    pretrained = [named(n, r) for n, r in ARCHITECTURES.items() if not r.from_scratch]
    scratch = [named(n, r) for n, r in ARCHITECTURES.items() if r.from_scratch]
    return "decoder: %s, or trained from scratch: %s" % (", ".join(pretrained), ", ".join(scratch))


def _refuse_foreign_options(args: argparse.Namespace) -> None:
    own = ARCHITECTURES[args.arch].option_names
    options = {o.dest: o for row in ARCHITECTURES.values() for o in row.options}
    foreign = sorted(dest for dest, option in options.items() if option.given(args) and dest not in own)
    if foreign:
        owners = ", ".join("%s (%s)" % (flag_name(dest), " or ".join(
            name for name, row in ARCHITECTURES.items() if dest in row.option_names)) for dest in foreign)
        raise UserError("--arch %s does not use %s" % (args.arch, owners))


def config_from_args(args: argparse.Namespace, output_ids=None):
    """The decoder config of --arch and its options, another architecture's options refused (output_ids: the compact
    output layer of a from-scratch decoder, known once the training captions are read; None while only the options
    are checked)."""
    _refuse_foreign_options(args)
    row = ARCHITECTURES[args.arch]
    return row.configure(row, args, output_ids)


def model_options(meta: dict) -> Dict[str, Any]:
    """The model options that rebuild a checkpoint's decoder config from its JSON (`meta`): arch and that
    architecture's own options as the checkpoint has them (for gpt2 the PEFT method and its options, without
    decoder_weights), in the order of their flags. With them, --init-from the checkpoint fits whatever the other
    training options are."""
    arch = meta.get("arch", DEFAULT)
    row = ARCHITECTURES[arch]
    return dict(arch=arch, **row.options_of_config(row, meta["decoder"]))


__all__ = ["ARCHITECTURES", "DEFAULT", "PEFT_METHODS", "PEFT_OPTIONS", "Architecture", "Option", "add_arguments",
           "arch_of", "config_from_args", "decoder_from_config", "model_options", "scratch_config", "scratch_options",
           "trained_from_scratch"]
