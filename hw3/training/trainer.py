"""Trains the P2 captioner: frozen ViT -> frozen GPT-2 with trained cross-attention and PEFT, one loop; or, with
--arch gru|attention-gru|transformer, a classic decoder trained from scratch over the same frozen encoder's tokens.

    python p2_train.py --train-json hw3_data/p2_data/train.json --train-images hw3_data/p2_data/images/train \\
        --val-json hw3_data/p2_data/val.json --val-images hw3_data/p2_data/images/val \\
        --decoder-weights hw3_data/p2_data/decoder_model.bin --peft lora --feature-cache cache/ --out runs/lora
    torchrun --nproc_per_node 2 p2_train.py ...same arguments...          # DDP: logs, checkpoints and eval on rank 0

Writes to --out: best.pt + best.json (trainable tensors + the config that rebuilds the model, via captioner.py),
last_state.pt (everything --resume needs, rewritten atomically at each epoch end), log.jsonl, val_predictions.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from hw3.models import clip_backend
from hw3.evaluation import metrics
from hw3.data import caption_files, datasets, feature_cache
from hw3.util import safe_load
from hw3.models.captioner import ARCHITECTURES, FROM_SCRATCH, build_captioner, read_checkpoint_config, save_checkpoint
from hw3.training.cider_reward import CiderD
from hw3.data.images import collate_images
from hw3.util.errors import UserError, run_main
from hw3.util.files import atomic_write, check_writable_dir, write_json
from hw3.models.output_vocab import collect_output_ids
from hw3.models.gpt2 import Config, peft_config
from hw3.models.encoder import DEFAULT_ENCODER
from hw3.models.rnn_decoder import GLOBAL_POOLS, RNNConfig
from hw3.models.decoding import DATA_LENGTH_KEY, DECODE_DEFAULTS, covering_max_len
from hw3.data.tokenizer import BPETokenizer
from hw3.models.transformer_decoder import TransformerConfig
from hw3.training.loop import (WARMUP_SHARE, BatchSplit, Dist, check_budget, effective_warmup, grad_scaler, log_line,
                               make_optimizer, resume, rng_state, save_state, scst_epoch, score, train_epoch, validate)

PEFT_METHODS = ("adapter", "prefix", "lora", "prompt", "none")
# The default --max-caption-tokens is the longest training caption rounded up to a multiple of this.
CAPTION_LENGTH_STEP = 8
# What may pick best.pt (+1: higher is better): every validation metric's field, "mean" (of metrics.MEAN_OF, as
# seed 004 picks), and the validation loss.
SELECT_METRICS = dict([(k.lower(), 1) for k in metrics.result_keys(metrics.METRIC_KEYS)], mean=1, val_loss=-1)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    def preset(method: str, field: str) -> str:
        value = peft_config(method).get(field, getattr(Config(), field))
        return ",".join(value) if isinstance(value, tuple) else str(value)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train-json", required=True, help="captions of the training images: COCO-style (the "
                   "course's), Karpathy split JSON, DeepFashion-MultiModal captions.json or {file name: caption or "
                   "[captions]}")
    g.add_argument("--train-images", required=True, help="folder of the training images")
    g.add_argument("--val-json", required=True, help="captions of the validation images (any of those formats; "
                   "may be the --train-json file)")
    g.add_argument("--val-images", required=True, help="folder of the validation images")
    g.add_argument("--train-split", choices=caption_files.SPLITS, default=None, help="split of --train-json trained on "
                   "(default: train of a file with splits, restval included; the whole of a file without, or its "
                   "train share by file-name hash when it is also --val-json)")
    g.add_argument("--val-split", choices=caption_files.SPLITS, default=None, help="split of --val-json validated on "
                   "(default: val of a file with splits; the whole of a file without, or its val share when it is "
                   "also --train-json)")
    g.add_argument("--val-fraction", type=float, default=caption_files.VAL_FRACTION, help="share of a file without "
                   "splits that the val split takes (by file-name hash: the same on every machine)")
    g.add_argument("--val-max-images", type=int, default=0, help="validate on the first N images only (0 = all)")
    g.add_argument("--max-caption-tokens", type=int, default=None, help="longer captions are cut to this many GPT-2 "
                   "tokens, and stderr says how many were (default: from the training captions, the longest rounded "
                   "up to a multiple of %d, within the decoder's positions; recorded in the checkpoint JSON)"
                   % CAPTION_LENGTH_STEP)
    g.add_argument("--raw-captions", action="store_true", help="train on captions as written (default: lower case, "
                   "single spaces, no trailing full stop)")
    g.add_argument("--augment", action="store_true", help="light crop and colour jitter (not with --feature-cache)")
    g.add_argument("--feature-cache", metavar="DIR", help="compute the frozen encoder's outputs once into memory-"
                   "mapped fp16 files in DIR and train from them (no ViT during training, no augmentation)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder spec (see encoder.py), default %(default)s")
    g.add_argument("--arch", choices=tuple(ARCHITECTURES), default="gpt2", help="decoder: gpt2 (the course's frozen "
                   "GPT-2 with PEFT, default), or trained from scratch: gru (a global image vector), attention-gru "
                   "(Show-Attend-Tell over the image tokens), transformer")
    g.add_argument("--decoder-weights", help="the course's decoder_model.bin (frozen GPT-2; --arch gpt2 only, needed)")
    g.add_argument("--peft", choices=PEFT_METHODS, help="PEFT method (none = cross-attention only; default lora)")
    g.add_argument("--adapter-dim", type=int, help="adapter bottleneck width (preset %s)" % preset("adapter", "adapter_dim"))
    g.add_argument("--adapter-places", help="comma list of self,cross,mlp (preset %s)" % preset("adapter", "adapter_places"))
    g.add_argument("--prefix-len", type=int, help="prefix tuning: prefix length (preset %s)" % preset("prefix", "prefix_len"))
    g.add_argument("--prefix-hidden", type=int, help="prefix tuning: reparameterisation MLP width, 0 = none "
                   "(preset %s)" % preset("prefix", "prefix_hidden"))
    g.add_argument("--prompt-len", type=int, help="prompt tuning: number of learned input embeddings (preset %s)" % preset("prompt", "prompt_len"))
    g.add_argument("--lora-rank", type=int, help="LoRA rank (preset %s)" % preset("lora", "lora_rank"))
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (preset %s)" % preset("lora", "lora_alpha"))
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout (preset %s)" % preset("lora", "lora_dropout"))
    g.add_argument("--lora-targets", help="comma list of attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj (preset %s)" % preset("lora", "lora_targets"))
    g.add_argument("--cross-attn-layers", help="comma list of decoder blocks with cross-attention (default every)")
    g.add_argument("--image-proj", choices=("linear", "mlp"), help="image token projection (gpt2 and transformer; "
                   "default linear)")
    g.add_argument("--no-cross-attn-gate", action="store_true", help="no tanh gate (at 0) on cross-attention")
    g = p.add_argument_group("from-scratch decoders (--arch gru, attention-gru, transformer); the caption length is "
                             "--max-caption-tokens, the output layer the GPT-2 ids of the training captions")
    g.add_argument("--embed-dim", type=int, help="gru, attention-gru: word embedding width (default %d)"
                   % RNNConfig.embed_dim)
    g.add_argument("--hidden-dim", type=int, help="gru, attention-gru: hidden state width (default %d)"
                   % RNNConfig.hidden_dim)
    g.add_argument("--attention-dim", type=int, help="attention-gru: additive attention width (default %d)"
                   % RNNConfig.attention_dim)
    g.add_argument("--attention-reg", type=float, help="attention-gru: weight of the doubly stochastic attention "
                   "term (1 - sum_t alpha)^2, Show-Attend-Tell's alpha_c (default %s; 0 = off)"
                   % RNNConfig.attention_reg)
    g.add_argument("--global-pool", choices=GLOBAL_POOLS, help="gru, attention-gru: the image's global vector (the "
                   "gru's input, both's first hidden state): mean of the tokens (default), or cls, a ViT's class "
                   "token")
    g.add_argument("--n-layer", type=int, help="transformer: blocks (default %d)" % TransformerConfig.n_layer)
    g.add_argument("--n-head", type=int, help="transformer: attention heads (default %d)" % TransformerConfig.n_head)
    g.add_argument("--n-embd", type=int, help="transformer: width (default %d)" % TransformerConfig.n_embd)
    g.add_argument("--dropout", type=float, help="gru, attention-gru (default %s), transformer (default %s): dropout"
                   % (RNNConfig.dropout, TransformerConfig.dropout))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="training epochs (every caption once per epoch)")
    g.add_argument("--batch-size", type=int, default=32, help="captions per step per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-steps", type=int, default=500, help="linear warmup steps, at most %d%%%% of the run's "
                   "steps (the steps used are printed and recorded)" % round(100 * WARMUP_SHARE))
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices only")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0 = off)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the caption loss (BLIP's "
                   "captioning setting)")
    g.add_argument("--no-amp", action="store_true", help="no fp16 autocast on CUDA (it is never used on CPU)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun picks cuda:LOCAL_RANK)")
    g = p.add_argument_group("validation and checkpoints")
    g.add_argument("--out", default="runs/p2", help="output folder")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last_state.pt if it exists")
    g.add_argument("--stop-after", type=int, default=0, help="end this run after N epochs (0 = run to --epochs); "
                   "continue later with --resume")
    g.add_argument("--select-on", "--select", dest="select", choices=tuple(SELECT_METRICS), default="cider",
                   help="what picks best.pt: a validation metric (it must be in --val-metrics), mean (of BLEU-4, "
                   "METEOR, ROUGE-L, CIDEr) or val_loss")
    g.add_argument("--val-metrics", default=None, help="comma list of %s, or all, scored at every validation "
                   "(default: cider,clipscore; cider with --no-clipscore)" % ", ".join(metrics.METRIC_KEYS))
    g.add_argument("--val-decode", choices=("greedy", "beam"), default="greedy", help="decoding of validation "
                   "captions (greedy is fastest)")
    g.add_argument("--val-beam-size", type=int, default=DECODE_DEFAULTS["beam_size"], help="beam size with beam")
    g.add_argument("--val-max-len", type=int, default=None, help="max caption tokens, end token included "
                   "(default: covers --max-caption-tokens, at least %d)" % DECODE_DEFAULTS["max_len"])
    g.add_argument("--val-batch-size", type=int, default=64, help="validation images per batch")
    g.add_argument("--encode-batch-size", type=int, default=64, help="images per batch when filling the cache")
    g.add_argument("--clip-model", default=clip_backend.CLIPSCORE_CLIP[0], help="CLIP for CLIPScore (open_clip name or config JSON)")
    g.add_argument("--clip-pretrained", default=clip_backend.CLIPSCORE_CLIP[1], help="CLIP weights: tag, local file, or none")
    g.add_argument("--no-clipscore", action="store_true", help="no CLIP metrics at validation (no CLIP needed)")
    g.add_argument("--log-every", type=int, default=50, help="log the training loss every N optimiser steps")
    g = p.add_argument_group("self-critical training (Rennie et al. 2017), after the cross-entropy epochs")
    g.add_argument("--scst-epochs", type=int, default=0, help="epochs that maximise CIDEr-D of sampled captions "
                   "(0 = none; with --init-from, --epochs 0 runs only these)")
    g.add_argument("--init-from", metavar="CHECKPOINT", help="start from a trained checkpoint's tensors (its arch and "
                   "config must be this run's), validated first as epoch 0")
    g.add_argument("--scst-samples", type=int, default=5, help="sampled captions per image")
    g.add_argument("--scst-baseline", choices=("mean", "greedy"), default="mean", help="mean: the image's other "
                   "samples' mean reward (new self-critical); greedy: its greedy caption's (the original)")
    g.add_argument("--scst-lr", type=float, default=2e-5, help="constant learning rate of the self-critical epochs")
    g.add_argument("--scst-temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    g.add_argument("--scst-end-word", action="store_true", help="count the end token in the reward's n-grams (as "
                   "ruotianluo's CiderD): a caption cut mid-phrase loses its last n-grams")
    g.add_argument("--scst-clip-weight", type=float, default=0.0, help="add W x CLIPScore of each sample to its "
                   "reward (the CLIP of --clip-model; image embeddings computed once)")
    args = p.parse_args(argv)
    if args.epochs == 0 and args.scst_epochs > 0:
        if not args.init_from:
            raise UserError("--epochs 0 trains nothing before self-critical training: give --init-from CHECKPOINT")
    elif args.epochs < 1:
        raise UserError("--epochs must be at least 1, got %s" % args.epochs)
    infinite = sorted(k for k, v in vars(args).items() if isinstance(v, float) and not math.isfinite(v))
    if infinite:
        raise UserError("--%s must be a finite number, got %s" % (infinite[0].replace("_", "-"),
                                                                  getattr(args, infinite[0])))
    least = 2 if args.scst_baseline == "mean" else 1
    if args.scst_samples < least:
        raise UserError("--scst-samples must be at least %d with --scst-baseline %s, got %d"
                        % (least, args.scst_baseline, args.scst_samples))
    if args.scst_epochs < 0 or not args.scst_lr > 0 or not args.scst_temperature > 0 or args.scst_clip_weight < 0:
        raise UserError("--scst-epochs and --scst-clip-weight must be 0 or more, --scst-lr and --scst-temperature "
                        "above 0")
    if args.init_from and not os.path.isfile(args.init_from):
        raise UserError("--init-from %s: no such checkpoint" % args.init_from)
    for name in ("batch_size", "grad_accum", "max_caption_tokens", "val_batch_size", "encode_batch_size",
                 "log_every", "val_beam_size", "val_max_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError("--%s must be at least 1, got %s" % (name.replace("_", "-"), getattr(args, name)))
    for name in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "stop_after", "val_max_images", "workers"):
        if getattr(args, name) < 0:
            raise UserError("--%s must be 0 or more, got %s" % (name.replace("_", "-"), getattr(args, name)))
    if not args.lr > 0:
        raise UserError("--lr must be above 0, got %s" % args.lr)
    if not 0 <= args.label_smoothing < 1:
        raise UserError("--label-smoothing must be in [0, 1), got %s" % args.label_smoothing)
    if args.augment and args.feature_cache:
        raise UserError("--augment needs the encoder at every step, so it cannot be used with --feature-cache")
    if args.no_clipscore and args.select in metrics.CLIP_METRICS:
        raise UserError("--select %s needs CLIP: drop --no-clipscore" % args.select)
    args.val_metrics = validation_metrics(args)
    return args


def validation_metrics(args: argparse.Namespace) -> tuple:
    """The metric names --val-metrics asks for, checked against --no-clipscore and --select-on before any work."""
    if args.val_metrics is None:
        names = tuple(m for m in metrics.DEFAULT_METRICS if not (args.no_clipscore and m in metrics.CLIP_METRICS))
    else:
        names = metrics.parse_metrics(args.val_metrics, "--val-metrics")
        clip_asked = [m for m in names if m in metrics.CLIP_METRICS]
        if args.no_clipscore and clip_asked:
            raise UserError("--val-metrics %s needs CLIP: drop --no-clipscore" % ",".join(clip_asked))
    fields = [k.lower() for k in metrics.result_keys(names)]
    needed = [k.lower() for k in metrics.MEAN_OF] if args.select == "mean" else [args.select]
    lacking = [k for k in needed if k != "val_loss" and k not in fields]
    if lacking:
        raise UserError("--select-on %s needs %s at validation: add %s to --val-metrics (it asks for %s)" % (
            args.select, ", ".join(lacking), ",".join(sorted({_metric_of(k) for k in lacking})), ",".join(names)))
    if any(k in ("meteor",) for k in needed) and metrics.meteor_unavailable():
        raise UserError("--select-on %s needs METEOR: %s" % (args.select, metrics.meteor_unavailable()))
    return names


def _metric_of(field: str) -> str:
    return next(name for name, keys in metrics.METRIC_KEYS.items() if field in (k.lower() for k in keys))


def _csv(text: Optional[str], cast=str):
    return None if text is None else tuple(cast(t.strip()) for t in text.split(",") if t.strip())


# Each PEFT method's own options: given with another --peft, they would be silently ignored, so they are refused.
PEFT_OPTIONS = {"adapter": ("adapter_dim", "adapter_places"), "prefix": ("prefix_len", "prefix_hidden"),
                "prompt": ("prompt_len",), "lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
PEFT_SIZES = {"adapter_dim": 1, "prefix_len": 1, "prompt_len": 1, "lora_rank": 1, "prefix_hidden": 0}  # least value


def _check_peft(args: argparse.Namespace, cfg: Config) -> None:
    for method, options in PEFT_OPTIONS.items():
        given = ["--" + o.replace("_", "-") for o in options if getattr(args, o) is not None]
        if given and method != args.peft:
            raise UserError("%s belong%s to --peft %s, not --peft %s" % (
                " and ".join(given), "s" if len(given) == 1 else "", method, args.peft))
    for option, least in PEFT_SIZES.items():
        if option in PEFT_OPTIONS.get(args.peft, ()) and getattr(cfg, option) < least:
            raise UserError("--%s must be at least %d for --peft %s, got %s" % (
                option.replace("_", "-"), least, args.peft, getattr(cfg, option)))
    if args.peft == "lora" and not (cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1):
        raise UserError("--lora-alpha must be above 0 and --lora-dropout in [0, 1), got %s and %s"
                        % (cfg.lora_alpha, cfg.lora_dropout))
    for option in PEFT_OPTIONS.get(args.peft, ()):
        if option in ("adapter_places", "lora_targets") and not getattr(cfg, option):
            raise UserError("--%s lists nothing" % option.replace("_", "-"))


# Each architecture's own options (None when not given): with another --arch they would be ignored, so they are refused.
ARCH_OPTIONS = {
    "gpt2": ("decoder_weights", "peft", "cross_attn_layers", "no_cross_attn_gate", "image_proj")
    + tuple(o for options in PEFT_OPTIONS.values() for o in options),
    "gru": ("embed_dim", "hidden_dim", "dropout", "global_pool"),
    "attention-gru": ("embed_dim", "hidden_dim", "attention_dim", "attention_reg", "dropout", "global_pool"),
    "transformer": ("n_layer", "n_head", "n_embd", "dropout", "image_proj"),
}


def model_flags(meta: dict) -> List[str]:
    """The model flags that rebuild a checkpoint's decoder config from its JSON (`meta`): --arch and that
    architecture's own options as the checkpoint has them (for gpt2 the PEFT method and its options, without
    --decoder-weights). With them, --init-from the checkpoint fits whatever the other training options are."""
    arch, cfg = meta.get("arch", "gpt2"), meta["decoder"]
    flags = ["--arch", arch]
    if arch == "gpt2":
        method = next((m for m, options in PEFT_OPTIONS.items() if cfg.get(options[0])), None)
        if method is None:
            raise UserError("the checkpoint's decoder config has no PEFT method (%s)" % ", ".join(PEFT_OPTIONS))
        flags += ["--peft", method] + ([] if cfg.get("cross_attn_gate", True) else ["--no-cross-attn-gate"])
        options = ("cross_attn_layers", "image_proj") + PEFT_OPTIONS[method]
    else:
        flags += ["--max-caption-tokens", str(cfg["block_size"] - 2)]  # + the start and end tokens
        options = tuple(o for o in ARCH_OPTIONS[arch] if o in cfg)
    for option in options:
        value = cfg.get(option)
        if value is not None:
            flags += ["--" + option.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, list)
                      else str(value)]
    return flags


def _check_arch_options(args: argparse.Namespace) -> None:
    given = [o for options in ARCH_OPTIONS.values() for o in options
             if getattr(args, o) is not None and getattr(args, o) is not False]  # 0 is given, False (a flag) not
    foreign = sorted({o for o in given if o not in ARCH_OPTIONS[args.arch]})
    if foreign:
        owners = ", ".join("--%s (%s)" % (o.replace("_", "-"), " or ".join(a for a, opts in ARCH_OPTIONS.items()
                                                                          if o in opts)) for o in foreign)
        raise UserError("--arch %s does not use %s" % (args.arch, owners))
    if args.arch == "gpt2" and not args.decoder_weights:
        raise UserError("--arch gpt2 needs --decoder-weights (the course's decoder_model.bin)")


def decoder_config(args: argparse.Namespace, output_ids=None):
    """The decoder config of --arch and its options (output_ids: the compact output layer of a from-scratch decoder,
    known once the training captions are read; None while only the options are checked)."""
    _check_arch_options(args)
    if args.arch != "gpt2":
        return _scratch_config(args, output_ids)
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


def _scratch_config(args: argparse.Namespace, output_ids):
    given = {o: getattr(args, o) for o in ARCH_OPTIONS[args.arch] if getattr(args, o) is not None}
    tokens = args.max_caption_tokens or CAPTION_LENGTH_STEP  # before the data are read, any length checks options
    common = dict(output_ids=output_ids, block_size=tokens + 2)  # + the start and end tokens
    if args.arch == "transformer":
        cfg = TransformerConfig(**common, **given)
    else:
        cfg = RNNConfig(arch=args.arch, **common, **given)
    try:
        dataclasses.replace(cfg, encoder_dim=1).validate()  # the encoder's width is set when the model is built
    except ValueError as err:
        raise UserError("--arch %s: %s" % (args.arch, err)) from None
    return cfg


# ----------------------------------------------------------------------------------------------- data

def load_splits(args):
    """The training and validation caption sets, checked before any model is built. One file given as both
    --train-json and --val-json is split (a file without splits by file-name hash), so train and val share no image
    unless overlapping splits are asked for (then stderr says so)."""
    same_file = os.path.abspath(args.train_json) == os.path.abspath(args.val_json)
    train_split = args.train_split or ("train" if same_file else None)
    val_split = args.val_split or ("val" if same_file else None)
    train = caption_files.load_captions(args.train_json, args.train_images, clean=not args.raw_captions,
                                        split=train_split, default_split="train", val_fraction=args.val_fraction,
                                        option="--train-split")
    val = caption_files.load_captions(args.val_json, args.val_images, clean=not args.raw_captions, split=val_split,
                                      default_split="val", val_fraction=args.val_fraction, option="--val-split")
    if same_file and os.path.abspath(args.train_images) == os.path.abspath(args.val_images):
        shared = set(train.names) & set(val.names)
        if shared:  # only splits asked for explicitly can overlap
            print("note: --train-split %s and --val-split %s of %s share %d image(s)" % (
                train.split, val.split, args.train_json, len(shared)), file=sys.stderr)
    return train, val.subset(args.val_max_images) if args.val_max_images else val


def data_caption_tokens(longest: int) -> int:
    """The default --max-caption-tokens for training captions whose longest has `longest` tokens: that, rounded up
    to a multiple of CAPTION_LENGTH_STEP, so no caption is cut."""
    return max(1, -(-longest // CAPTION_LENGTH_STEP)) * CAPTION_LENGTH_STEP


def caption_length(args, train, world: Dist) -> None:
    """Sets --max-caption-tokens from the training captions when it was not given (the longest, rounded up to a
    multiple of CAPTION_LENGTH_STEP: no caption is cut) and --val-max-len to a length covering it; says so."""
    if args.max_caption_tokens is None:
        _, _, longest = datasets.tokenize_captions(train.captions, BPETokenizer(), sys.maxsize)
        args.max_caption_tokens = data_caption_tokens(longest)
        if world.main:
            print("caption length: --max-caption-tokens %d from the training captions (the longest has %d tokens, "
                  "rounded up to a multiple of %d)" % (args.max_caption_tokens, longest, CAPTION_LENGTH_STEP),
                  file=sys.stderr)
    if args.val_max_len is None:
        args.val_max_len = covering_max_len(args.max_caption_tokens)


def trained_caption_tokens(args, captioner) -> int:
    """The caption length training used: --max-caption-tokens within the decoder's positions (start and end)."""
    return min(args.max_caption_tokens, captioner.decoder.max_text_len - 2)


def build_data(args, train, val, captioner, world: Dist):
    tokenizer = BPETokenizer()
    max_tokens = trained_caption_tokens(args, captioner)
    train_tokens, cut, longest = datasets.tokenize_captions(train.captions, tokenizer, max_tokens)
    val_tokens, val_cut, val_longest = datasets.tokenize_captions(val.captions, tokenizer, max_tokens)
    if world.main and (cut or val_cut):
        limit = ("--max-caption-tokens %d" % max_tokens if max_tokens == args.max_caption_tokens else
                 "%d tokens (the decoder's %d positions less start and end)" % (max_tokens,
                                                                                 captioner.decoder.max_text_len))
        print("captions cut to %s: %d of %d training (longest %d tokens), %d of %d validation (longest %d)"
              % (limit, cut, sum(map(len, train_tokens)), longest, val_cut, sum(map(len, val_tokens)), val_longest),
              file=sys.stderr)
    encoder = captioner.encoder
    if args.feature_cache:
        run = feature_cache.Encoding(batch_size=args.encode_batch_size, device=world.device, num_workers=args.workers,
                                     amp=world.device.type == "cuda" and not args.no_amp, rank=world.rank,
                                     world_size=world.world_size, barrier=world.barrier)
        train_visuals = datasets.Features(feature_cache.build_feature_cache(args.feature_cache, "train", encoder, train,
                                                                            run))
        val_visuals = datasets.Features(feature_cache.build_feature_cache(args.feature_cache, "val", encoder, val, run))
        captioner.release_encoder()  # never run again: free the accelerator for the decoder
    else:
        augment = datasets.light_augmentation() if args.augment else None
        train_visuals = datasets.images(train, encoder.transform, augment)
        val_visuals = datasets.images(val, encoder.transform)
    pairs = datasets.CaptionPairs(train_visuals, train_tokens)
    sampler = DistributedSampler(pairs, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(pairs, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=datasets.collate_pairs, pin_memory=world.device.type == "cuda")
    val_loader = DataLoader(val_visuals, batch_size=args.val_batch_size, num_workers=args.workers,
                            collate_fn=collate_images)
    scst_loader = None
    if args.scst_epochs:  # the training images, each once per epoch, as many per step as --batch-size captions
        scst_sampler = DistributedSampler(train_visuals, num_replicas=world.world_size, rank=world.rank, shuffle=True,
                                          seed=args.seed)
        scst_loader = DataLoader(train_visuals, batch_size=max(1, args.batch_size // args.scst_samples),
                                 sampler=scst_sampler, num_workers=args.workers, collate_fn=collate_images)
    return loader, sampler, val_loader, val_tokens, scst_loader


def init_from(args, captioner) -> None:
    """--init-from: the trained tensors of a checkpoint of this very model (arch and decoder config)."""
    meta = read_checkpoint_config(args.init_from)
    ours = captioner.decoder.cfg.to_dict()
    theirs = dict(meta["decoder"])
    ours.pop("checkpoint", None)
    differ = sorted(k for k in set(ours) | set(theirs) if json.dumps(ours.get(k)) != json.dumps(theirs.get(k)))
    if meta["arch"] != captioner.arch or differ:
        raise UserError("--init-from %s is a %s with another config than this run's %s (differs in: %s)"
                        % (args.init_from, meta["arch"], captioner.arch, ", ".join(differ) or "arch"))
    captioner.decoder.load_trainable_state_dict(safe_load.load_tensors(args.init_from, "checkpoint"))


def make_reward(args, train, clip, device):
    """The self-critical reward of (training image indices, captions): CIDEr-D against each image's training
    references (document frequencies of the training split, computed once), plus --scst-clip-weight x CLIPScore
    (the image embeddings computed once)."""
    keys = train.keys()
    cider = CiderD({k: refs for k, refs in zip(keys, train.references)}, end_word=args.scst_end_word)
    image_embeddings = None
    if args.scst_clip_weight > 0:
        model, preprocess, tokenizer = clip
        image_embeddings = metrics.clip_image_embeddings([train.path(i) for i in range(len(keys))], model,
                                                         preprocess, device=str(device), num_workers=args.workers)

    def reward(rows: List[int], captions: List[str], ended: List[bool]) -> List[float]:
        values = cider.scores([keys[i] for i in rows], captions, ended)
        if image_embeddings is not None:
            clip_scores = metrics.clip_text_scores(image_embeddings[rows], captions, clip[0], clip[2],
                                                   device=str(device))
            values = [v + args.scst_clip_weight * c for v, c in zip(values, clip_scores)]
        return values
    return reward


# ----------------------------------------------------------------------------------------------- validation

def load_clip(args, device):
    """The CLIP triple for CLIPScore, loaded once before any training (None when no CLIP metric is asked)."""
    if not any(m in metrics.CLIP_METRICS for m in args.val_metrics) and not args.scst_clip_weight > 0:
        return None
    try:
        return clip_backend.load_clip(args.clip_model, args.clip_pretrained, str(device))
    except UserError as err:
        raise UserError("CLIPScore: %s (here: --clip-pretrained PATH, or --no-clipscore to validate with CIDEr only)"
                        % err) from None


# ----------------------------------------------------------------------------------------------- state

# The options a run's trajectory depends on: --resume refuses to continue a run under others.
TRAJECTORY_OPTIONS = ("raw_captions", "max_caption_tokens", "augment", "val_max_images", "epochs", "batch_size",
                      "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "label_smoothing",
                      "no_amp", "seed", "select")


# Trajectory options added later: recorded only away from their defaults, so earlier runs still resume.
LATER_TRAJECTORY_OPTIONS = dict(train_split=None, val_split=None, val_fraction=caption_files.VAL_FRACTION, scst_epochs=0,
                                init_from=None, scst_samples=5, scst_baseline="mean", scst_lr=2e-5,
                                scst_temperature=1.0, scst_clip_weight=0.0, scst_end_word=False)
SCST_OPTIONS = ("scst_epochs", "scst_samples", "scst_baseline", "scst_lr", "scst_temperature", "scst_clip_weight",
                "scst_end_word", "init_from")  # recorded in the checkpoint JSON of a self-critical run


def model_settings(args, captioner) -> dict:
    """What must not change between a run and its --resume: the model and the options of TRAJECTORY_OPTIONS."""
    cfg = captioner.decoder.cfg.to_dict()
    cfg.pop("checkpoint", None)
    later = {k: getattr(args, k) for k, default in LATER_TRAJECTORY_OPTIONS.items() if getattr(args, k) != default}
    if captioner.arch != "gpt2":  # recorded only for the later architectures, so earlier runs still resume
        later["arch"] = captioner.arch
    return dict({k: getattr(args, k) for k in TRAJECTORY_OPTIONS}, encoder=str(captioner.encoder_spec), decoder=cfg,
                **later)


# ----------------------------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # missing weights fail at once (hw3_download.sh fetches them)
    args = parse_args(argv)
    world = Dist(args.device)
    try:
        return _run(args, world)
    finally:
        world.close()


def _run(args, world: Dist) -> int:
    started = time.time()
    state_path, log_path = os.path.join(args.out, "last_state.pt"), os.path.join(args.out, "log.jsonl")
    if not args.resume and os.path.isfile(state_path):
        raise UserError("%s holds a training state from an earlier run: pass --resume to continue it, or choose "
                        "another --out" % args.out)
    cfg = decoder_config(args)  # option errors first, then the output folders, then the data
    for folder, what in ((args.out, "--out"), (args.feature_cache, "--feature-cache")):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError("%s %s is not a folder" % (what, folder))
        if folder and world.main:
            check_writable_dir(folder, what + " folder")
    train, val = load_splits(args)
    caption_length(args, train, world)
    if args.arch in FROM_SCRATCH:  # the compact output layer: the GPT-2 ids of the training captions
        tokens, _, _ = datasets.tokenize_captions(train.captions, BPETokenizer(), args.max_caption_tokens)
        cfg = decoder_config(args, collect_output_ids(ids for image in tokens for ids in image))
    torch.manual_seed(args.seed)  # identical initial trainable weights on every rank
    random.seed(args.seed)
    np.random.seed(args.seed)
    captioner = build_captioner(args.encoder, cfg)
    summary = check_budget(captioner.decoder)
    captioner.to(world.device)
    if args.init_from:
        init_from(args, captioner)
    clip = load_clip(args, world.device) if world.main or args.scst_clip_weight > 0 else None
    setup_seconds = time.time() - started  # repeated by every run, unlike filling the feature cache
    loader, sampler, val_loader, val_tokens, scst_loader = build_data(args, train, val, captioner, world)
    reward = make_reward(args, train, clip, world.device) if args.scst_epochs else None

    amp = world.device.type == "cuda" and not args.no_amp
    model = captioner  # its forward is the training step's model call; under torchrun, DDP wraps it
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            captioner, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    total_steps = args.epochs * math.ceil(len(loader) / args.grad_accum)
    optimizer, scheduler = make_optimizer(captioner.decoder, args, total_steps)
    warmup = effective_warmup(args.warmup_steps, total_steps)
    if world.main:
        print("warm-up: %d of %d optimiser steps (--warmup-steps %d, at most %d%% of the run), then cosine from "
              "--lr %g to --min-lr %g" % (warmup, total_steps, args.warmup_steps, round(100 * WARMUP_SHARE), args.lr,
                                          args.min_lr), file=sys.stderr)
    scaler = grad_scaler(amp)
    settings = model_settings(args, captioner)
    os.makedirs(args.out, exist_ok=True)
    sign = SELECT_METRICS[args.select]
    start_epoch, step, best = 0, 0, None
    torch.manual_seed(args.seed + world.rank)  # per-rank dropout and augmentation streams
    if args.resume and os.path.isfile(state_path):
        state = resume(state_path, settings, captioner, optimizer, scheduler, scaler, world)
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        if world.main:
            if os.path.isfile(log_path) and os.path.getsize(log_path) > state["log_bytes"]:
                with open(log_path, "r+b") as f:
                    f.truncate(state["log_bytes"])  # drop the step lines of the epoch that was interrupted
            print("resuming after epoch %d (best %s)" % (start_epoch, best), file=sys.stderr)
    elif world.main:
        with atomic_write(log_path):
            pass
        write_json(os.path.join(args.out, "args.json"), vars(args))
        log_line(log_path, kind="start", parameters=summary, settings=settings, steps=total_steps,
                 warmup_steps=warmup, time=round(time.time(), 1),
                 setup_seconds=round(setup_seconds, 1))  # run_all's time estimate

    def validate_and_keep(epoch: int, record: dict, best: Optional[dict]) -> Optional[dict]:
        """Validation captions and scores after `epoch` (0: the --init-from model); best.pt follows --select-on
        across the cross-entropy and self-critical epochs."""
        result = validate(captioner, val_loader, val, val_tokens, args, world.device, amp)
        write_json(os.path.join(args.out, "val_predictions.json"), result["predictions"])
        record.update(score(result["predictions"], val, args.val_metrics, clip, world.device),
                      val_loss=result["val_loss"])
        value = record.get(args.select)
        if value is None:
            raise UserError("the evaluation gave no %s (it gave %s)" % (args.select, ", ".join(record)))
        if best is None or sign * (value - best["value"]) > 0:
            best = dict(metric=args.select, value=value, epoch=epoch)
            extra = dict(epoch=epoch, phase=record.get("phase", "cross-entropy"), metrics={
                k: record[k] for k in record if k not in ("kind", "epoch", "step", "train_seconds", "phase")},
                validation_decoding=dict(method=args.val_decode, beam_size=args.val_beam_size,
                                         max_len=args.val_max_len),  # a record, not for inference
                warmup_steps=warmup, total_steps=total_steps,
                **{DATA_LENGTH_KEY: trained_caption_tokens(args, captioner)})  # inference's default length
            if args.scst_epochs:
                extra["scst"] = {k: getattr(args, k) for k in SCST_OPTIONS}
            save_checkpoint(os.path.join(args.out, "best.pt"), captioner, extra=extra)
        record["best_epoch"] = best["epoch"]
        log_line(log_path, **record)
        print(json.dumps(record), file=sys.stderr)
        return best

    if args.init_from and start_epoch == 0 and world.main:
        best = validate_and_keep(0, dict(kind="epoch", epoch=0, step=0, phase="init"), best)
    total_epochs = args.epochs + args.scst_epochs
    split = BatchSplit()  # pieces per micro-batch: more after a CUDA out-of-memory error, for the rest of the run
    end_epoch = min(total_epochs, start_epoch + args.stop_after) if args.stop_after else total_epochs
    for epoch in range(start_epoch, end_epoch):
        started = time.time()
        if epoch < args.epochs:
            sampler.set_epoch(epoch)
            step = train_epoch(epoch, model, captioner, loader, optimizer, scheduler, scaler, args, world, amp,
                               log_path, step, split)
            figures = {}
        else:
            scst_loader.sampler.set_epoch(epoch)
            step, figures = scst_epoch(epoch, model, captioner, scst_loader, train.keys(), reward, optimizer,
                                       scheduler, scaler, args, world, amp, log_path, step)
        record = dict(kind="epoch", epoch=epoch + 1, step=step, train_seconds=round(time.time() - started, 2),
                      **figures)
        if world.main:
            best = validate_and_keep(epoch + 1, record, best)
        rngs = world.gather(rng_state())
        if world.main:
            save_state(state_path, epoch=epoch + 1, step=step, best=best, settings=settings,
                       world_size=world.world_size, trainable=captioner.decoder.trainable_state_dict(),
                       optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                       scaler=scaler.state_dict() if scaler.is_enabled() else None, rng=rngs,
                       log_bytes=os.path.getsize(log_path))
        world.barrier()
    if world.main and best is not None:
        print("best %s %.4f at epoch %d: %s" % (best["metric"], best["value"], best["epoch"],
                                                 os.path.join(args.out, "best.pt")), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
