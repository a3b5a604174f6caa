"""Tokenised captions as training data: the course's caption targets (inputs and targets shifted by one, padding
ignored), the image or cached-feature Datasets of a caption set and the batches of (visual, caption) pairs.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from hw3.data.images import ImageFiles
from hw3.util.errors import UserError
from hw3.data.tokenizer import END_TOKEN
from hw3.data.caption_files import CaptionSet

IGNORE_INDEX = -100  # targets on padding: CrossEntropyLoss(ignore_index=-100), as the course's 11/27 note says


def tokenize_captions(captions: List[List[str]], tokenizer, max_tokens: int) -> Tuple[List[List[List[int]]], int, int]:
    """(token ids of every caption cut to `max_tokens`, how many were cut, the longest length before cutting); the
    end token is added by `caption_targets`."""
    full = [[tokenizer.encode(c) for c in caps] for caps in captions]
    lengths = [len(t) for caps in full for t in caps]
    return ([[t[:max_tokens] for t in caps] for caps in full], sum(1 for n in lengths if n > max_tokens),
            max(lengths, default=0))


def caption_targets(token_lists: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The course's training pair for a batch of token lists, padded to the longest (K = N_max + 2):
    inputs  [50256, t1..tN, 50256, 50256...]   targets [t1..tN, 50256, -100, -100...]  (both (B, K))."""
    K = max(len(t) for t in token_lists) + 2
    inputs = torch.full((len(token_lists), K), END_TOKEN, dtype=torch.long)
    targets = torch.full((len(token_lists), K), IGNORE_INDEX, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        n = len(tokens)
        inputs[row, 1:n + 1] = torch.tensor(list(tokens), dtype=torch.long)
        targets[row, :n] = inputs[row, 1:n + 1]
        targets[row, n] = END_TOKEN
    return inputs, targets


# ----------------------------------------------------------------------------------------------- images

def light_augmentation() -> Callable:
    """A mild crop (80-100% of the area) and colour jitter before the encoder's own transform. No horizontal flip:
    captions say "left" and "right"."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    jitter = T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1)

    def augment(image):
        top, left, height, width = T.RandomResizedCrop.get_params(image, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3))
        return jitter(TF.crop(image, top, left, height, width))

    return augment


def images(caption_set: CaptionSet, transform: Callable, augment: Optional[Callable] = None) -> ImageFiles:
    """The split's images as common.ImageFiles, (index, pixels, error), through the encoder's transform, optionally
    augmented first."""
    if augment is not None:
        transform = _then(augment, transform)
    return ImageFiles([caption_set.path(i) for i in range(len(caption_set.names))], transform)


class _then:
    """f then g, as an object so DataLoader workers can pickle it."""

    def __init__(self, f: Callable, g: Callable):
        self.f, self.g = f, g

    def __call__(self, x):
        return self.g(self.f(x))


class Features(Dataset):
    """(index, cached image tokens (N, width) fp16, "") from a feature-cache file, shaped like ImageFiles' items and
    opened lazily in each process so DataLoader workers never pickle the memory map."""

    def __init__(self, path: str):
        self.path = path
        self.shape = tuple(np.load(path, mmap_mode="r").shape)
        self._rows = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int):
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return index, torch.from_numpy(np.array(self._rows[index])), ""


class CaptionPairs(Dataset):
    """Every (image, caption) pair of a split: the decoder sees each caption once per epoch."""

    def __init__(self, visuals: Dataset, tokens: List[List[List[int]]]):
        self.visuals = visuals
        self.pairs = [(i, j) for i, caps in enumerate(tokens) for j in range(len(caps))]
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image, caption = self.pairs[index]
        _, visual, error = self.visuals[image]
        if error:
            raise UserError(error)
        return visual, self.tokens[image][caption]


def collate_pairs(batch):
    """[(visual, tokens)] -> (visuals (B, ...), inputs (B, K), targets (B, K))."""
    visuals = torch.stack([v for v, _ in batch])
    inputs, targets = caption_targets([t for _, t in batch])
    return visuals, inputs, targets
