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
import math
import os
import sys
from typing import List, Optional

from hw3.data import caption_files
from hw3.evaluation import metrics
from hw3.models import clip_backend, registry
from hw3.models.encoder import DEFAULT_ENCODER
from hw3.models.decoding import DECODE_DEFAULTS
from hw3.util.errors import UserError
from hw3.training.config import TrainingConfig, validation_metric_names
from hw3.util.config import flag_name
from hw3.training.data import CAPTION_LENGTH_STEP
from hw3.training.optimiser import WARMUP_SHARE
from hw3.training.validation import SELECT_METRICS


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
    g.add_argument("--clip-model", default=clip_backend.CLIPSCORE_CLIP[0],
                   help="CLIP for CLIPScore (open_clip name or config JSON)")
    g.add_argument("--clip-pretrained", default=clip_backend.CLIPSCORE_CLIP[1],
                   help="CLIP weights: tag, local file, or none")
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
    validation_metrics(TrainingConfig.from_options(vars(args)))
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


def validation_metrics(config: TrainingConfig) -> tuple:
    """The metric names --val-metrics asks for, checked against --no-clipscore and --select-on before any work."""
    v = config.validation
    names = validation_metric_names(config)
    clip_asked = [m for m in names if m in metrics.CLIP_METRICS]
    if v.no_clipscore and clip_asked:  # only when asked for by name: the default set leaves them out
        raise UserError("--val-metrics %s needs CLIP: drop --no-clipscore" % ",".join(clip_asked))
    fields = [k.lower() for k in metrics.result_keys(names)]
    needed = [k.lower() for k in metrics.MEAN_OF] if v.select == "mean" else [v.select]
    lacking = [k for k in needed if k != "val_loss" and k not in fields]
    if lacking:
        raise UserError("--select-on %s needs %s at validation: add %s to --val-metrics (it asks for %s)" % (
            v.select, ", ".join(lacking), ",".join(sorted({_metric_of(k) for k in lacking})), ",".join(names)))
    if any(k in ("meteor",) for k in needed) and metrics.meteor_unavailable():
        raise UserError("--select-on %s needs METEOR: %s" % (v.select, metrics.meteor_unavailable()))
    return names


def _metric_of(field: str) -> str:
    return next(name for name, keys in metrics.METRIC_KEYS.items() if field in (k.lower() for k in keys))

