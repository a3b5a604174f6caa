"""A training run's data: the training and validation captions (one file split by file-name hash when it is both),
the caption length, and the loaders over images or the frozen encoder's cached features."""
from __future__ import annotations

import os
import sys
from typing import NamedTuple, Optional

from torch.utils.data import DataLoader, DistributedSampler

from hw3.data import caption_files, datasets, feature_cache
from hw3.data.images import collate_images
from hw3.data.tokenizer import shared_tokenizer
from hw3.models.decoding import covering_max_len
from hw3.training.config import DataSettings, TrainingConfig
from hw3.training.state import Dist

# The default --max-caption-tokens is the longest training caption rounded up to a multiple of this.
CAPTION_LENGTH_STEP = 8


def load_splits(data: DataSettings):
    """The training and validation caption sets, checked before any model is built. One file given as both
    --train-json and --val-json is split (a file without splits by file-name hash), so train and val share no image
    unless overlapping splits are asked for (then stderr says so)."""
    same_file = os.path.abspath(data.train_json) == os.path.abspath(data.val_json)
    train_split = data.train_split or ("train" if same_file else None)
    val_split = data.val_split or ("val" if same_file else None)
    train = caption_files.load_captions(data.train_json, data.train_images, clean=not data.raw_captions, split=train_split,
                                 default_split="train", val_fraction=data.val_fraction, option="--train-split")
    val = caption_files.load_captions(data.val_json, data.val_images, clean=not data.raw_captions, split=val_split,
                               default_split="val", val_fraction=data.val_fraction, option="--val-split")
    if same_file and os.path.abspath(data.train_images) == os.path.abspath(data.val_images):
        shared = set(train.names) & set(val.names)
        if shared:  # only splits asked for explicitly can overlap
            print("note: --train-split %s and --val-split %s of %s share %d image(s)" % (
                train.split, val.split, data.train_json, len(shared)), file=sys.stderr)
    return train, val.subset(data.val_max_images) if data.val_max_images else val


def data_caption_tokens(longest: int) -> int:
    """The default --max-caption-tokens for training captions whose longest has `longest` tokens: that, rounded up
    to a multiple of CAPTION_LENGTH_STEP, so no caption is cut."""
    return max(1, -(-longest // CAPTION_LENGTH_STEP)) * CAPTION_LENGTH_STEP


def caption_length(config: TrainingConfig, train, world: Dist) -> TrainingConfig:
    """`config` with --max-caption-tokens from the training captions when it was not given (the longest, rounded up
    to a multiple of CAPTION_LENGTH_STEP: no caption is cut), said on stderr, and --val-max-len covering it."""
    max_tokens = config.data.max_caption_tokens
    if max_tokens is None:
        _, _, longest = datasets.tokenize_captions(train.captions, shared_tokenizer(), sys.maxsize)
        max_tokens = data_caption_tokens(longest)
        if world.main:
            print("caption length: --max-caption-tokens %d from the training captions (the longest has %d tokens, "
                  "rounded up to a multiple of %d)" % (max_tokens, longest, CAPTION_LENGTH_STEP), file=sys.stderr)
    val_max_len = config.validation.val_max_len
    return config.replace(max_caption_tokens=max_tokens,
                          val_max_len=covering_max_len(max_tokens) if val_max_len is None else val_max_len)


def trained_caption_tokens(data: DataSettings, captioner) -> int:
    """The caption length training used: --max-caption-tokens within the decoder's positions (start and end)."""
    return min(data.max_caption_tokens, captioner.decoder.max_text_len - 2)


class TrainingData(NamedTuple):
    loader: DataLoader  # the (image, caption) pairs of the cross-entropy epochs
    sampler: DistributedSampler
    val_loader: DataLoader
    val_tokens: list  # each validation image's reference captions as token ids
    scst_loader: Optional[DataLoader]  # the training images of the self-critical epochs


def build_data(config: TrainingConfig, train, val, captioner, world: Dist) -> TrainingData:
    """The loaders of a run: (image, caption) pairs of the training split, the validation images, and with
    --scst-epochs the training images once each."""
    train_tokens, val_tokens = _caption_tokens(config.data, train, val, captioner, world)
    train_visuals, val_visuals = _visuals(config, train, val, captioner, world)
    batch_size, workers, seed = config.optimisation.batch_size, config.run.workers, config.optimisation.seed
    pairs = datasets.CaptionPairs(train_visuals, train_tokens)
    sampler = DistributedSampler(pairs, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=seed)
    loader = DataLoader(pairs, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=datasets.collate_pairs, pin_memory=world.device.type == "cuda")
    val_loader = DataLoader(val_visuals, batch_size=config.validation.val_batch_size, num_workers=workers,
                            collate_fn=collate_images)
    scst_loader = None
    if config.scst.scst_epochs:  # the training images, each once per epoch, as many per step as --batch-size captions
        scst_sampler = DistributedSampler(train_visuals, num_replicas=world.world_size, rank=world.rank, shuffle=True,
                                          seed=seed)
        scst_loader = DataLoader(train_visuals, batch_size=max(1, batch_size // config.scst.scst_samples),
                                 sampler=scst_sampler, num_workers=workers, collate_fn=collate_images)
    return TrainingData(loader, sampler, val_loader, val_tokens, scst_loader)


def _caption_tokens(data: DataSettings, train, val, captioner, world: Dist):
    """The training and validation captions as GPT-2 ids, cut to the trained length (stderr says how many were)."""
    tokenizer = shared_tokenizer()
    max_tokens = trained_caption_tokens(data, captioner)
    train_tokens, cut, longest = datasets.tokenize_captions(train.captions, tokenizer, max_tokens)
    val_tokens, val_cut, val_longest = datasets.tokenize_captions(val.captions, tokenizer, max_tokens)
    if world.main and (cut or val_cut):
        limit = ("--max-caption-tokens %d" % max_tokens if max_tokens == data.max_caption_tokens else
                 "%d tokens (the decoder's %d positions less start and end)" % (max_tokens,
                                                                                 captioner.decoder.max_text_len))
        print("captions cut to %s: %d of %d training (longest %d tokens), %d of %d validation (longest %d)"
              % (limit, cut, sum(map(len, train_tokens)), longest, val_cut, sum(map(len, val_tokens)), val_longest),
              file=sys.stderr)
    return train_tokens, val_tokens


def _visuals(config: TrainingConfig, train, val, captioner, world: Dist):
    """What the decoder reads of the training and validation images: the frozen encoder's outputs from the feature
    cache (then the encoder is released), or the images themselves (augmented with --augment)."""
    encoder = captioner.encoder
    if config.data.feature_cache:
        run = feature_cache.Encoding(batch_size=config.run.encode_batch_size, device=world.device,
                                     num_workers=config.run.workers, rank=world.rank, world_size=world.world_size,
                                     amp=world.device.type == "cuda" and not config.optimisation.no_amp,
                                     barrier=world.barrier)
        cache = config.data.feature_cache
        train_visuals = datasets.Features(feature_cache.build_feature_cache(cache, "train", encoder, train, run))
        val_visuals = datasets.Features(feature_cache.build_feature_cache(cache, "val", encoder, val, run))
        captioner.release_encoder()  # never run again: free the accelerator for the decoder
        return train_visuals, val_visuals
    augment = datasets.light_augmentation() if config.data.augment else None
    return datasets.images(train, encoder.transform, augment), datasets.images(val, encoder.transform)
