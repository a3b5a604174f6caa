"""Downloads, once, everything hw3_1.sh and hw3_2.sh need that is not in the repository.

- P1's CLIP (open_clip name + tag) and P2's image encoder (timm name.tag) go into the caches those libraries read,
  so inference loads them with the hub offline.
- P2's trained checkpoint comes from RELEASE below (the one place that names it), is resumed if a previous try broke
  off, and is checked against its size and SHA-256 before it is moved into place.
Run again, it checks and skips what is already there.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import urllib.error
import urllib.request

from common import UserError, progress, run_main

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_HOST = "huggingface.co"
CHUNK = 1 << 20
CLIPSCORE_CLIP = ("ViT-B-32", "openai")  # the course's CLIPScore model

# The trained P2 checkpoint: its JSON config is committed beside where the tensors land; the tensors are downloaded.
# Empty url: no trained release exists yet (see README, "What could not be verified here").
RELEASE = dict(
    url="",
    sha256="",
    bytes=0,
    path=os.path.join("checkpoints", "p2_best.pt"),
)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: str, sha256: str, size: int, timeout: float = 30.0) -> str:
    """Downloads url to dest through dest + '.part', resuming a partial file with an HTTP range request; the file is
    renamed into place only when its size and SHA-256 match."""
    if os.path.isfile(dest) and (not sha256 or sha256_of(dest) == sha256):
        print("ok (already here): %s" % dest, file=sys.stderr)
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    request = urllib.request.Request(url, headers={"Range": "bytes=%d-" % have} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part file is already complete
            response = None
        else:
            raise UserError("download of %s failed: HTTP %d %s" % (url, err.code, err.reason)) from None
    except (urllib.error.URLError, OSError) as err:
        raise UserError("cannot reach %s: %s (hw3_download.sh needs the internet)" % (url, err)) from None
    if response is not None:
        resumed = have and response.status == 206
        mode = "ab" if resumed else "wb"
        total = size or (have if resumed else 0) + int(response.headers.get("Content-Length") or 0) or None
        with response, open(part, mode) as out, progress(total=total, initial=have if resumed else 0, unit="B",
                                                          unit_scale=True, desc=os.path.basename(dest)) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))
    got = os.path.getsize(part)
    if size and got != size:
        raise UserError("%s: got %d bytes, expected %d; run hw3_download.sh again to resume" % (part, got, size))
    if sha256 and sha256_of(part) != sha256:
        os.unlink(part)
        raise UserError("%s failed its SHA-256 check (expected %s); the broken download was removed, run again"
                        % (dest, sha256))
    os.replace(part, dest)
    print("ok (downloaded): %s" % dest, file=sys.stderr)
    return dest


def check_online(host: str = HUB_HOST, timeout: float = 5.0) -> None:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        raise UserError("cannot reach %s (%s): hw3_download.sh needs the internet; everything else runs offline "
                        "once it has run" % (host, err)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-p1", action="store_true", help="do not fetch P1's CLIP")
    parser.add_argument("--skip-p2", action="store_true", help="do not fetch P2's encoder and checkpoint")
    parser.add_argument("--with-clipscore", action="store_true",
                        help="also fetch CLIP ViT-B-32/openai, which p2_evaluate.py and training use for CLIPScore")
    args = parser.parse_args(argv)
    check_online()
    import p1_clip_zeroshot
    from captioner import DEFAULT_ENCODER, download_encoder

    if not args.skip_p1:
        import clip_utils

        path = clip_utils.download_clip(p1_clip_zeroshot.DEFAULT_MODEL, p1_clip_zeroshot.DEFAULT_PRETRAINED)
        print("P1 CLIP %s/%s: %s" % (p1_clip_zeroshot.DEFAULT_MODEL, p1_clip_zeroshot.DEFAULT_PRETRAINED, path))
    if args.with_clipscore:
        import clip_utils

        print("CLIPScore CLIP %s/%s: %s" % (CLIPSCORE_CLIP + (clip_utils.download_clip(*CLIPSCORE_CLIP),)))
    if not args.skip_p2:
        download_encoder(DEFAULT_ENCODER)
        print("P2 encoder %s: in the hub cache" % DEFAULT_ENCODER)
        if not RELEASE["url"]:
            raise UserError("no trained P2 checkpoint has been released yet (RELEASE in hw3_download.py is empty): "
                            "train one with p2_train.py and pass it to p2_inference.py --checkpoint")
        fetch(RELEASE["url"], os.path.join(HERE, RELEASE["path"]), RELEASE["sha256"], RELEASE["bytes"])
    return 0


if __name__ == "__main__":
    run_main(main)
