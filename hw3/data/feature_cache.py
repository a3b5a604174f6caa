"""The encoder feature cache.

The encoder is frozen, so its output for an image never changes: `build_feature_cache` computes the image tokens of
a split once into a memory-mapped fp16 .npy file, keyed by the encoder spec, its weights, its transform and the image
list. Later epochs and later runs read rows from that file and never run the ViT (and so cannot augment images).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np
import torch

from hw3.data.images import collate_images, image_batches, load_rgb
from hw3.util.device import autocast
from hw3.util.errors import UserError, progress
from hw3.util.files import file_sha256, read_json, write_json
from hw3.util.resources import HalvingBatches
from hw3.data.caption_files import CaptionSet
from hw3.data.datasets import images

CACHE_VERSION = 2  # 2: each image's content hash is recorded and checked


# ----------------------------------------------------------------------------------------------- feature cache

def _encoder_identity(encoder) -> dict:
    """What decides an encoder's output: its spec, the stat of a local weight file, and its transform."""
    weights, stat = encoder.spec.weight_file, None
    if weights and os.path.isfile(weights):
        info = os.stat(weights)
        stat = [os.path.abspath(weights), info.st_size, int(info.st_mtime)]
    elif encoder.spec.random:  # random weights: the spec alone may not pin them down
        digest = hashlib.sha1()
        for tensor in encoder.state_dict().values():
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        stat = ["random", digest.hexdigest()]
    return dict(spec=str(encoder.spec), weights_file=stat, transform=repr(encoder.transform), width=int(encoder.width))


def cache_key(encoder, caption_set: CaptionSet) -> Tuple[str, dict]:
    identity = dict(version=CACHE_VERSION, encoder=_encoder_identity(encoder),
                    folder=os.path.abspath(caption_set.folder), names=caption_set.names)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return digest, identity


def cache_paths(cache_dir: str, split: str, digest: str) -> Tuple[str, str]:
    stem = os.path.join(cache_dir, "%s-%s" % (split, digest))
    return stem + ".npy", stem + ".json"


def content_hashes(caption_set: CaptionSet, show: bool = True) -> List[str]:
    """SHA-256 of every image file's bytes: what the cache is keyed by, so an image replaced under the same name is
    encoded again."""
    return [file_sha256(caption_set.path(i)) for i in progress(range(len(caption_set.names)), desc="hashing images",
                                                               unit="img", disable=not show, leave=False)]


@dataclass(frozen=True)
class Encoding:
    """How the cache's images are encoded: images per batch, the device, loader processes, fp16 autocast, and under
    DDP this process's rank among world_size with the barrier that waits for all."""
    batch_size: int = 64
    device: object = "cpu"
    num_workers: int = 0
    amp: bool = False
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None


@torch.no_grad()
def _fill_rows(rows, encoder, caption_set: CaptionSet, indices: List[int], run: Encoding) -> None:
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(images(caption_set, encoder.transform), indices), batch_size=run.batch_size,
                        num_workers=run.num_workers, collate_fn=collate_images)
    pieces = HalvingBatches("the feature cache's encoding")

    def encode(pixels: torch.Tensor) -> np.ndarray:
        with autocast(run.device, run.amp):
            return encoder(pixels.to(run.device)).float().cpu().numpy().astype(np.float16)  # (B, N, width)

    show = run.rank == 0
    for index, pixels in image_batches(progress(loader, desc="encoding %d images" % len(indices), disable=not show)):
        rows[np.array(index)] = np.concatenate(pieces(len(pixels), lambda s, e: encode(pixels[s:e])))


def reserve_disk_space(path: str, what: str) -> None:
    """Allocates a memory-mapped file's blocks now: a full disk is then one line here rather than a SIGBUS when the
    mapped rows are written back. The file is removed when the space is not there."""
    from hw3.util import resources

    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if resources.disk_full(err) is None:
            return  # a file system without fallocate: written as before
        os.close(fd)
        fd = None
        os.remove(path)
        raise UserError(resources.disk_full_line(path, what)) from None
    finally:
        if fd is not None:
            os.close(fd)


def build_feature_cache(cache_dir: str, split: str, encoder, caption_set: CaptionSet,
                        run: Encoding = Encoding()) -> str:
    """Path of the split's cache, computing what is missing. The cache of an encoder and image list records each
    image's content hash: images whose content changed since are encoded again (and stderr says how many), the rest
    are reused. Under DDP every rank encodes its share into the same file (rank 0 creates it, `barrier` waits for
    all); the description JSON marks it complete."""
    rank, barrier = run.rank, run.barrier
    digest, identity = cache_key(encoder, caption_set)
    path, meta_path = cache_paths(cache_dir, split, digest)
    hashes = content_hashes(caption_set, show=rank == 0)
    meta = read_json(meta_path, "feature-cache description") if os.path.isfile(meta_path) else {}
    reusable = (os.path.isfile(path) and meta.get("identity") == identity and meta.get("complete")
                and len(meta.get("contents") or []) == len(hashes))
    todo = [i for i, h in enumerate(hashes) if not reusable or meta["contents"][i] != h]
    if not todo:
        return path
    target = path if reusable else path[:-len(".npy")] + ".partial.npy"
    if rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        if reusable:  # rows are rewritten in place: incomplete until they are all done
            write_json(meta_path, dict(meta, complete=False))
        else:
            with torch.no_grad():
                probe = encoder(encoder.transform(load_rgb(caption_set.path(0))).unsqueeze(0).to(run.device))
            shape = (len(caption_set.names),) + tuple(probe.shape[1:])
            np.lib.format.open_memmap(target, mode="w+", dtype=np.float16, shape=shape).flush()
            reserve_disk_space(target, "the feature cache")
    barrier()
    rows = np.load(target, mmap_mode="r+")
    _fill_rows(rows, encoder, caption_set, todo[rank::run.world_size], run)
    rows.flush()
    del rows
    barrier()
    if rank == 0:
        if not reusable:
            os.replace(target, path)
        write_json(meta_path, dict(identity=identity, complete=True, contents=hashes,
                                   shape=list(np.load(path, mmap_mode="r").shape)))
        print("feature cache: %s (%s)" % (path, "encoded %d images" % len(todo) if not reusable else
                                          "re-encoded %d of %d images whose content changed" % (len(todo),
                                                                                                len(hashes))),
              file=sys.stderr)
    barrier()
    return path
