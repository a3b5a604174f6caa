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
import json
import math
import os
import random
import sys
import time
from typing import List, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from hw3.models import clip_backend
from hw3.evaluation import metrics
from hw3.data import corpus
from hw3.util import safe_load
from hw3.models import registry
from hw3.models.captioner import build_captioner, read_checkpoint_config, save_checkpoint
from hw3.training.cider_reward import CiderD
from hw3.data.images import collate_images
from hw3.util.errors import UserError, run_main
from hw3.util.files import atomic_write, check_writable_dir, write_json
from hw3.models.output_vocab import collect_output_ids
from hw3.models.encoder import DEFAULT_ENCODER
from hw3.models.search import DATA_LENGTH_KEY, DECODE_DEFAULTS, covering_max_len
from hw3.data.tokenizer import BPETokenizer
from hw3.training.config import TrainingConfig, flag_name, validation_metric_names
from hw3.training.loop import (WARMUP_SHARE, Dist, TrainingState, check_budget, effective_warmup, grad_scaler, log_line,
                               make_optimizer, resume, rng_state, save_state, scst_epoch, score, train_epoch, validate)

# The default --max-caption-tokens is the longest training caption rounded up to a multiple of this.
CAPTION_LENGTH_STEP = 8
# What may pick best.pt (+1: higher is better): every validation metric's field, "mean" (of metrics.MEAN_OF, as
# seed 004 picks), and the validation loss.
SELECT_METRICS = dict([(k.lower(), 1) for k in metrics.result_keys(metrics.METRIC_KEYS)], mean=1, val_loss=-1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (_data_arguments, _model_arguments, _optimisation_arguments, _validation_arguments, _scst_arguments):
        add(p)
    return p


def _data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--train-json", required=True, help="captions of the training images: COCO-style (the "
                   "course's), Karpathy split JSON, DeepFashion-MultiModal captions.json or {file name: caption or "
                   "[captions]}")
    g.add_argument("--train-images", required=True, help="folder of the training images")
    g.add_argument("--val-json", required=True, help="captions of the validation images (any of those formats; "
                   "may be the --train-json file)")
    g.add_argument("--val-images", required=True, help="folder of the validation images")
    g.add_argument("--train-split", choices=corpus.SPLITS, default=None, help="split of --train-json trained on "
                   "(default: train of a file with splits, restval included; the whole of a file without, or its "
                   "train share by file-name hash when it is also --val-json)")
    g.add_argument("--val-split", choices=corpus.SPLITS, default=None, help="split of --val-json validated on "
                   "(default: val of a file with splits; the whole of a file without, or its val share when it is "
                   "also --train-json)")
    g.add_argument("--val-fraction", type=float, default=corpus.VAL_FRACTION, help="share of a file without "
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


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder spec (see encoder.py), default %(default)s")
    registry.add_arguments(p, g)  # --arch and each architecture's options


def _optimisation_arguments(p: argparse.ArgumentParser) -> None:
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


def _validation_arguments(p: argparse.ArgumentParser) -> None:
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


def _scst_arguments(p: argparse.ArgumentParser) -> None:
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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line, checked before any work."""
    args = build_parser().parse_args(argv)
    for check in (_check_epochs, _check_numbers, _check_scst, _check_combinations):
        check(args)
    validation_metrics(args)
    return args


def _check_epochs(args: argparse.Namespace) -> None:
    if args.epochs == 0 and args.scst_epochs > 0:
        if not args.init_from:
            raise UserError("--epochs 0 trains nothing before self-critical training: give --init-from CHECKPOINT")
    elif args.epochs < 1:
        raise UserError("--epochs must be at least 1, got %s" % args.epochs)
    infinite = sorted(k for k, v in vars(args).items() if isinstance(v, float) and not math.isfinite(v))
    if infinite:
        raise UserError("%s must be a finite number, got %s" % (flag_name(infinite[0]), getattr(args, infinite[0])))


def _check_scst(args: argparse.Namespace) -> None:
    least = 2 if args.scst_baseline == "mean" else 1
    if args.scst_samples < least:
        raise UserError("--scst-samples must be at least %d with --scst-baseline %s, got %d"
                        % (least, args.scst_baseline, args.scst_samples))
    if args.scst_epochs < 0 or not args.scst_lr > 0 or not args.scst_temperature > 0 or args.scst_clip_weight < 0:
        raise UserError("--scst-epochs and --scst-clip-weight must be 0 or more, --scst-lr and --scst-temperature "
                        "above 0")
    if args.init_from and not os.path.isfile(args.init_from):
        raise UserError("--init-from %s: no such checkpoint" % args.init_from)


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("batch_size", "grad_accum", "max_caption_tokens", "val_batch_size", "encode_batch_size",
                 "log_every", "val_beam_size", "val_max_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError("%s must be at least 1, got %s" % (flag_name(name), getattr(args, name)))
    for name in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "stop_after", "val_max_images", "workers"):
        if getattr(args, name) < 0:
            raise UserError("%s must be 0 or more, got %s" % (flag_name(name), getattr(args, name)))
    if not args.lr > 0:
        raise UserError("--lr must be above 0, got %s" % args.lr)
    if not 0 <= args.label_smoothing < 1:
        raise UserError("--label-smoothing must be in [0, 1), got %s" % args.label_smoothing)


def _check_combinations(args: argparse.Namespace) -> None:
    if args.augment and args.feature_cache:
        raise UserError("--augment needs the encoder at every step, so it cannot be used with --feature-cache")
    if args.no_clipscore and args.select in metrics.CLIP_METRICS:
        raise UserError("--select %s needs CLIP: drop --no-clipscore" % args.select)


def parse_config(argv: Optional[List[str]] = None) -> TrainingConfig:
    """The command line as a TrainingConfig: its options in the order given, with their parsed values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_args(argv)
    given = []
    for token in argv:
        action = _action_of(parser, token)
        if action is not None and action.dest not in given:
            given.append(action.dest)
    return TrainingConfig.from_options({dest: getattr(args, dest) for dest in given})


def _action_of(parser: argparse.ArgumentParser, token: str):
    """The option a command-line word names (a unique prefix as argparse allows), or None for a value."""
    if not token.startswith("--"):
        return None
    name = token.split("=", 1)[0]
    if name in parser._option_string_actions:
        return parser._option_string_actions[name]
    matches = {a for o, a in parser._option_string_actions.items() if o.startswith(name)}
    return matches.pop() if len(matches) == 1 else None


def command_settings(config: TrainingConfig) -> argparse.Namespace:
    """Every option of the command line with the config's value, in the parser's order (args.json's, and what the
    architecture options' checks read)."""
    given = vars(config.namespace())
    return argparse.Namespace(**{a.dest: given.get(a.dest, a.default) for a in build_parser()._actions
                                 if a.dest != "help"})


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


# ----------------------------------------------------------------------------------------------- data

def load_splits(args):
    """The training and validation caption sets, checked before any model is built. One file given as both
    --train-json and --val-json is split (a file without splits by file-name hash), so train and val share no image
    unless overlapping splits are asked for (then stderr says so)."""
    same_file = os.path.abspath(args.train_json) == os.path.abspath(args.val_json)
    train_split = args.train_split or ("train" if same_file else None)
    val_split = args.val_split or ("val" if same_file else None)
    train = corpus.load_captions(args.train_json, args.train_images, clean=not args.raw_captions, split=train_split,
                                  default_split="train", val_fraction=args.val_fraction, option="--train-split")
    val = corpus.load_captions(args.val_json, args.val_images, clean=not args.raw_captions, split=val_split,
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
        _, _, longest = corpus.tokenize_captions(train.captions, BPETokenizer(), sys.maxsize)
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
    train_tokens, cut, longest = corpus.tokenize_captions(train.captions, tokenizer, max_tokens)
    val_tokens, val_cut, val_longest = corpus.tokenize_captions(val.captions, tokenizer, max_tokens)
    if world.main and (cut or val_cut):
        limit = ("--max-caption-tokens %d" % max_tokens if max_tokens == args.max_caption_tokens else
                 "%d tokens (the decoder's %d positions less start and end)" % (max_tokens,
                                                                                 captioner.decoder.max_text_len))
        print("captions cut to %s: %d of %d training (longest %d tokens), %d of %d validation (longest %d)"
              % (limit, cut, sum(map(len, train_tokens)), longest, val_cut, sum(map(len, val_tokens)), val_longest),
              file=sys.stderr)
    encoder = captioner.encoder
    if args.feature_cache:
        kwargs = dict(batch_size=args.encode_batch_size, device=world.device, num_workers=args.workers,
                      amp=world.device.type == "cuda" and not args.no_amp, rank=world.rank,
                      world_size=world.world_size, barrier=world.barrier)
        train_visuals = corpus.Features(corpus.build_feature_cache(args.feature_cache, "train", encoder, train,
                                                                     **kwargs))
        val_visuals = corpus.Features(corpus.build_feature_cache(args.feature_cache, "val", encoder, val, **kwargs))
        captioner.release_encoder()  # never run again: free the accelerator for the decoder
    else:
        augment = corpus.light_augmentation() if args.augment else None
        train_visuals = corpus.images(train, encoder.transform, augment)
        val_visuals = corpus.images(val, encoder.transform)
    pairs = corpus.CaptionPairs(train_visuals, train_tokens)
    sampler = DistributedSampler(pairs, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(pairs, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=corpus.collate_pairs, pin_memory=world.device.type == "cuda")
    val_loader = DataLoader(val_visuals, batch_size=args.val_batch_size, num_workers=args.workers,
                            collate_fn=collate_images)
    scst_loader = None
    if args.scst_epochs:  # the training images, each once per epoch, as many per step as --batch-size captions
        scst_sampler = DistributedSampler(train_visuals, num_replicas=world.world_size, rank=world.rank, shuffle=True,
                                          seed=args.seed)
        scst_loader = DataLoader(train_visuals, batch_size=max(1, args.batch_size // args.scst_samples),
                                 sampler=scst_sampler, num_workers=args.workers, collate_fn=collate_images)
    return TrainingData(loader, sampler, val_loader, val_tokens, scst_loader)


class TrainingData(NamedTuple):
    loader: DataLoader  # the (image, caption) pairs of the cross-entropy epochs
    sampler: DistributedSampler
    val_loader: DataLoader
    val_tokens: list  # each validation image's reference captions as token ids
    scst_loader: Optional[DataLoader]  # the training images of the self-critical epochs


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
LATER_TRAJECTORY_OPTIONS = dict(train_split=None, val_split=None, val_fraction=corpus.VAL_FRACTION, scst_epochs=0,
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
    return train(parse_config(argv))


def train(config: TrainingConfig) -> int:
    """One training run of `config` (the pipeline's entry, and the command line's)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # missing weights fail at once (hw3_download.sh fetches them)
    world = Dist(config.run.device)
    try:
        return _run(config, world)
    finally:
        world.close()


def _run(config: TrainingConfig, world: Dist) -> int:
    started = time.time()
    args, captioner, train_set, val, summary = _setup(config, world)
    config = TrainingConfig.from_options(vars(args))  # resolved: the caption length, PEFT method, metric names
    clip = load_clip(args, world.device) if world.main or args.scst_clip_weight > 0 else None
    setup_seconds = time.time() - started  # repeated by every run, unlike filling the feature cache
    data = build_data(args, train_set, val, captioner, world)
    reward = make_reward(args, train_set, clip, world.device) if args.scst_epochs else None
    state, total_steps, warmup = _training_state(config, captioner, world, len(data.loader))
    settings = model_settings(args, captioner)
    best = _resume_or_start(state, args, settings, dict(parameters=summary, steps=total_steps, warmup_steps=warmup,
                                                         setup_seconds=round(setup_seconds, 1)))
    keeper = Keeper(state, data, val, clip, dict(warmup_steps=warmup, total_steps=total_steps))
    state.settings = settings
    if args.init_from and state.first_epoch == 0 and world.main:
        best = keeper.validate_and_keep(0, dict(kind="epoch", epoch=0, step=0, phase="init"), best)
    best = _fit(state, data, keeper, train_set.keys(), reward, best)
    if world.main and best is not None:
        print("best %s %.4f at epoch %d: %s" % (best["metric"], best["value"], best["epoch"],
                                                 os.path.join(args.out, "best.pt")), file=sys.stderr)
    return 0


def _has_state(config: TrainingConfig) -> bool:
    return config.run.resume and os.path.isfile(os.path.join(config.run.out, "last_state.pt"))


def _setup(config: TrainingConfig, world: Dist):
    """Options checked, folders checked, data read, caption length set, the model built (and --init-from loaded):
    in that order, so a wrong option fails before any work."""
    args = command_settings(config)
    if not args.resume and os.path.isfile(os.path.join(args.out, "last_state.pt")):
        raise UserError("%s holds a training state from an earlier run: pass --resume to continue it, or choose "
                        "another --out" % args.out)
    args.val_metrics = validation_metrics(args)
    cfg = registry.config_from_args(args)  # option errors first, then the output folders, then the data
    for folder, what in ((args.out, "--out"), (args.feature_cache, "--feature-cache")):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError("%s %s is not a folder" % (what, folder))
        if folder and world.main:
            check_writable_dir(folder, what + " folder")
    train_set, val = load_splits(args)
    caption_length(args, train_set, world)
    if registry.ARCHITECTURES[args.arch].from_scratch:  # the compact output layer: the training captions' GPT-2 ids
        tokens, _, _ = corpus.tokenize_captions(train_set.captions, BPETokenizer(), args.max_caption_tokens)
        cfg = registry.config_from_args(args, collect_output_ids(ids for image in tokens for ids in image))
    torch.manual_seed(args.seed)  # identical initial trainable weights on every rank
    random.seed(args.seed)
    np.random.seed(args.seed)
    captioner = build_captioner(args.encoder, cfg)
    summary = check_budget(captioner.decoder)
    captioner.to(world.device)
    if args.init_from:
        init_from(args, captioner)
    return args, captioner, train_set, val, summary


def _training_state(config: TrainingConfig, captioner, world: Dist, micro_batches: int):
    """The model (DDP-wrapped under torchrun), optimiser, schedule and scaler; the run's steps and warm-up."""
    o = config.optimisation
    model = captioner  # its forward is the training step's model call; under torchrun, DDP wraps it
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            captioner, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    total_steps = o.epochs * math.ceil(micro_batches / o.grad_accum)
    optimizer, scheduler = make_optimizer(captioner.decoder, config, total_steps)
    warmup = effective_warmup(o.warmup_steps, total_steps)
    if world.main:
        print("warm-up: %d of %d optimiser steps (--warmup-steps %d, at most %d%% of the run), then cosine from "
              "--lr %g to --min-lr %g" % (warmup, total_steps, o.warmup_steps, round(100 * WARMUP_SHARE), o.lr,
                                          o.min_lr), file=sys.stderr)
    amp = world.device.type == "cuda" and not o.no_amp
    state = TrainingState(config, captioner, model, optimizer, scheduler, grad_scaler(amp), world,
                          os.path.join(config.run.out, "log.jsonl"))
    return state, total_steps, warmup


def _resume_or_start(state: TrainingState, args, settings: dict, start: dict) -> Optional[dict]:
    """--resume: the saved state loaded and the interrupted epoch's log lines dropped; else a new log and args.json.
    Returns the best validation so far (None before any)."""
    world, log_path, out = state.world, state.log_path, state.config.run.out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(args.seed + world.rank)  # per-rank dropout and augmentation streams
    if _has_state(state.config):
        saved = resume(state, os.path.join(out, "last_state.pt"), settings)
        if world.main:
            if os.path.isfile(log_path) and os.path.getsize(log_path) > saved["log_bytes"]:
                with open(log_path, "r+b") as f:
                    f.truncate(saved["log_bytes"])  # drop the step lines of the epoch that was interrupted
            print("resuming after epoch %d (best %s)" % (saved["epoch"], saved["best"]), file=sys.stderr)
        state.first_epoch = saved["epoch"]
        return saved["best"]
    state.first_epoch = 0
    if world.main:
        with atomic_write(log_path):
            pass
        write_json(os.path.join(out, "args.json"), vars(args))
        log_line(log_path, kind="start", settings=settings, time=round(time.time(), 1), **start)  # run_all's estimate
    return None


class Keeper:
    """Validation after an epoch, and best.pt kept by --select-on across the cross-entropy and self-critical
    epochs."""

    def __init__(self, state: TrainingState, data, val, clip, schedule: dict):
        self.state, self.data, self.val, self.clip, self.schedule = state, data, val, clip, schedule

    def validate_and_keep(self, epoch: int, record: dict, best: Optional[dict]) -> Optional[dict]:
        """Validation captions and scores after `epoch` (0: the --init-from model), logged; best.pt rewritten when
        they beat `best`. Returns the best so far."""
        state, config = self.state, self.state.config
        select, out = config.validation.select, config.run.out
        result = validate(state, self.data.val_loader, self.val, self.data.val_tokens)
        write_json(os.path.join(out, "val_predictions.json"), result["predictions"])
        record.update(score(result["predictions"], self.val, validation_metric_names(config), self.clip,
                            state.world.device), val_loss=result["val_loss"])
        value = record.get(select)
        if value is None:
            raise UserError("the evaluation gave no %s (it gave %s)" % (select, ", ".join(record)))
        if best is None or SELECT_METRICS[select] * (value - best["value"]) > 0:
            best = dict(metric=select, value=value, epoch=epoch)
            save_checkpoint(os.path.join(out, "best.pt"), state.captioner, extra=self._checkpoint_record(epoch, record))
        record["best_epoch"] = best["epoch"]
        log_line(state.log_path, **record)
        print(json.dumps(record), file=sys.stderr)
        return best

    def _checkpoint_record(self, epoch: int, record: dict) -> dict:
        config = self.state.config
        v = config.validation
        extra = dict(epoch=epoch, phase=record.get("phase", "cross-entropy"), metrics={
            k: record[k] for k in record if k not in ("kind", "epoch", "step", "train_seconds", "phase")},
            validation_decoding=dict(method=v.val_decode, beam_size=v.val_beam_size,
                                     max_len=v.val_max_len),  # a record, not for inference
            **self.schedule, **{DATA_LENGTH_KEY: trained_caption_tokens(config.data, self.state.captioner)})
        if config.scst.scst_epochs:
            extra["scst"] = {k: getattr(config.scst, k) for k in SCST_OPTIONS}
        return extra


def _fit(state: TrainingState, data, keeper: Keeper, keys: List[str], reward, best: Optional[dict]) -> Optional[dict]:
    """The cross-entropy epochs, then the self-critical ones, each validated and saved for --resume; --stop-after
    ends the run early."""
    config, world = state.config, state.world
    total_epochs = config.optimisation.epochs + config.scst.scst_epochs
    stop_after = config.run.stop_after
    end_epoch = min(total_epochs, state.first_epoch + stop_after) if stop_after else total_epochs
    for epoch in range(state.first_epoch, end_epoch):
        started = time.time()
        if epoch < config.optimisation.epochs:
            data.sampler.set_epoch(epoch)
            train_epoch(state, epoch, data.loader)
            figures = {}
        else:
            data.scst_loader.sampler.set_epoch(epoch)
            figures = scst_epoch(state, epoch, data.scst_loader, keys, reward)
        record = dict(kind="epoch", epoch=epoch + 1, step=state.step, train_seconds=round(time.time() - started, 2),
                      **figures)
        if world.main:
            best = keeper.validate_and_keep(epoch + 1, record, best)
        _save(state, epoch + 1, best)
    return best


def _save(state: TrainingState, epoch: int, best: Optional[dict]) -> None:
    """Everything --resume needs, after `epoch`, written by rank 0 (every rank's random streams)."""
    rngs = state.world.gather(rng_state())
    if state.world.main:
        scaler = state.scaler
        save_state(os.path.join(state.config.run.out, "last_state.pt"), epoch=epoch, step=state.step, best=best,
                   settings=state.settings, world_size=state.world.world_size,
                   trainable=state.decoder.trainable_state_dict(), optimizer=state.optimizer.state_dict(),
                   scheduler=state.scheduler.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
                   rng=rngs, log_bytes=os.path.getsize(state.log_path))
    state.world.barrier()


if __name__ == "__main__":
    run_main(main)
