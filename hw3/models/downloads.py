"""Downloads, once, everything hw3_1.sh and hw3_2.sh need that is not in the repository.

Parts, each tried whatever happened to the ones before; a summary line per part ends the run:
- P1 CLIP: open_clip EVA02-L-14 / merged2b_s4b_b131k (about 0.86 GB) into the Hugging Face hub cache when open_clip
  is installed, else OpenAI's ViT-L/14@336px (about 0.9 GB) into ~/.cache/clip through OpenAI clip's own
  downloader (downloaded only: loading never runs code from the file).
- P2 image encoder: timm vit_huge_patch14_clip_quickgelu_224.dfn5b (about 3.9 GB) into the hub cache.
- CNN encoder, with --cnn [NAME]: a timm CNN's weights into the hub cache, for the classic captioners; by default
  resnet101.tv2_in1k, torchvision's ResNet-101 weights (about 0.18 GB).
- Another encoder, with --encoder NAME.TAG: any timm model's weights (a ViT or a CNN), e.g. p2_train.py --encoder's.
- CLIPScore CLIP, with --with-clipscore: open_clip ViT-B-32 / openai (about 0.6 GB), for p2_evaluate.py and training.
- P2 trained checkpoint: from RELEASE below (the one place that names it), resumed if a previous try broke off, and
  checked against its size and SHA-256 before it is moved into place. Until one is released this is a warning that
  says what to do instead, not a failure.
Run again, it checks and skips what is already there. Exit status 0 when every part it can fetch is in place, 1 when
a part failed (2 for a wrong command line).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.error
import urllib.request
from typing import Callable, List, NamedTuple, Optional

from hw3.models import clip_backend
from hw3.models import encoder
from hw3.util.errors import UserError, progress, run_main
from hw3.util.files import file_sha256
from hw3 import REPO_ROOT

HUB_HOST = "huggingface.co"
CHUNK = 1 << 20
DEFAULT_CNN = encoder.EncoderSpec.parse(encoder.DEFAULT_CNN_ENCODER).name  # what --cnn alone fetches

# The trained P2 checkpoint: its JSON config is committed beside where the tensors land; the tensors are downloaded.
# Empty url: no trained release exists yet (see README, "What could not be verified here").
RELEASE = dict(
    url="",
    sha256="",
    bytes=0,
    path=os.path.join("checkpoints", "p2_best.pt"),
)


def fetch(url: str, dest: str, sha256: str, size: int, timeout: float = 30.0) -> str:
    """Downloads url to dest through dest + '.part', resuming a partial file with an HTTP range request; the file is
    renamed into place only when its size and SHA-256 match."""
    if os.path.isfile(dest) and (not sha256 or file_sha256(dest) == sha256):
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
    if sha256 and file_sha256(part) != sha256:
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


class NotReleased(Exception):
    """A part that cannot be fetched yet; its message is the next step."""


class Part(NamedTuple):
    name: str
    cached: Callable[[], Optional[str]]  # offline: the file already in place, or None
    fetch: Callable[[], str]  # online: downloads and returns the file


def _fails(err: Exception) -> Callable:
    def raise_it():
        raise err

    return raise_it


def p1_clip_part() -> Part:
    """open_clip's EVA02-L-14 where open_clip imports (P1's default), else OpenAI's ViT-L/14@336px."""
    backend = clip_backend.resolve_backend("auto")
    model, tag = clip_backend.P1_MODELS[backend]
    if backend == "openai":
        return openai_clip_part("P1 CLIP %s (OpenAI's clip)" % model, model)
    return open_clip_part("P1 CLIP %s/%s (open_clip)" % (model, tag), model, tag)


def open_clip_part(name: str, model: str, tag: str) -> Part:
    return Part(name, lambda: clip_backend.cached_clip(model, tag), lambda: clip_backend.download_clip(model, tag))


def openai_clip_part(name: str, model: str) -> Part:
    def cached() -> Optional[str]:
        path = clip_backend.openai_weights_path(model)
        expected = clip_backend.openai_weights_url(model).split("/")[-2]  # OpenAI's URLs name the file's SHA-256
        return path if os.path.isfile(path) and file_sha256(path) == expected else None

    return Part(name, cached, lambda: clip_backend.download_openai_clip(model))


def encoder_part(label: str, spec: str) -> Part:
    def fetch() -> str:
        encoder.download_encoder(spec)
        return cached() or "the hub cache"

    def cached() -> Optional[str]:
        return encoder.timm_weights_cached(encoder.EncoderSpec.parse(spec).name)

    return Part("%s %s" % (label, spec), cached, fetch)


def cnn_spec(name: str) -> str:
    """--cnn's NAME[.TAG] (or timm:NAME[.TAG]) as an encoder spec with the tag's hub weights."""
    spec = name if name.startswith("timm:") else "timm:" + name
    try:
        parsed = encoder.EncoderSpec.parse(spec)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if parsed.weights is not None or parsed.options:
        raise argparse.ArgumentTypeError("%r: name a timm model and its pretrained tag (NAME.TAG, e.g. %s), without "
                                         "@weights or ?options" % (name, DEFAULT_CNN))
    return spec


def checkpoint_part() -> Part:
    dest = os.path.join(REPO_ROOT, RELEASE["path"])
    config = os.path.splitext(dest)[0] + ".json"

    def cached() -> Optional[str]:
        if not RELEASE["url"]:
            if os.path.isfile(dest) and os.path.isfile(config):
                return dest  # put there by hand
            raise NotReleased("train one with p2_train.py, then put its URL, SHA-256 and size in RELEASE in "
                              "hw3/models/downloads.py, or copy OUT/best.pt and OUT/best.json to %s and %s"
                              % (RELEASE["path"], os.path.relpath(config, REPO_ROOT)))
        if os.path.isfile(dest) and (not RELEASE["sha256"] or file_sha256(dest) == RELEASE["sha256"]):
            return dest
        return None

    return Part("P2 checkpoint", cached, lambda: fetch(RELEASE["url"], dest, RELEASE["sha256"], RELEASE["bytes"]))


def _built(name: str, make: Callable[[], Part]) -> Part:
    """A part, or one that fails with the reason it could not be set up (e.g. a library that does not import)."""
    try:
        return make()
    except Exception as err:  # reported in the summary like any other failure
        return Part(name, _fails(err), _fails(err))


def plan(args: argparse.Namespace) -> List[Part]:
    parts = []
    if not args.skip_p1:
        parts.append(_built("P1 CLIP", p1_clip_part))
    if not args.skip_p2:
        parts.append(_built("P2 encoder", lambda: encoder_part("P2 encoder", encoder.DEFAULT_ENCODER)))
    if args.cnn:
        parts.append(_built("CNN encoder", lambda: encoder_part("CNN encoder", args.cnn)))
    if getattr(args, "encoder", None):
        parts.append(_built("encoder", lambda: encoder_part("encoder", args.encoder)))
    if args.with_clipscore:
        parts.append(_built("CLIPScore CLIP", lambda: open_clip_part(
            "CLIPScore CLIP %s/%s (open_clip)" % clip_backend.CLIPSCORE_CLIP, *clip_backend.CLIPSCORE_CLIP)))
    if not args.skip_p2:
        parts.append(_built("P2 checkpoint", checkpoint_part))
    return parts


def one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, UserError) else "%s: %s" % (type(err).__name__, text[:300])


def get(part: Part, offline_reason: Optional[str]) -> str:
    """The part's outcome as one line; raises what went wrong."""
    path = part.cached()
    if path:
        return "already there: %s" % path
    if offline_reason:
        raise UserError("not attempted, %s" % offline_reason)
    return "ok (downloaded): %s" % part.fetch()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-p1", action="store_true", help="do not fetch P1's CLIP")
    parser.add_argument("--skip-p2", action="store_true", help="do not fetch P2's encoder and checkpoint")
    parser.add_argument("--with-clipscore", action="store_true",
                        help="also fetch CLIP ViT-B-32/openai, which p2_evaluate.py and training use for CLIPScore")
    parser.add_argument("--cnn", nargs="?", type=cnn_spec, const=encoder.DEFAULT_CNN_ENCODER, metavar="NAME",
                        help="also fetch a timm CNN encoder's weights (timm NAME.TAG) for the classic captioners; "
                             "alone, %s (torchvision's ResNet-101 weights, about 0.18 GB)"
                             % DEFAULT_CNN)
    parser.add_argument("--encoder", type=cnn_spec, metavar="NAME", help="also fetch any other timm encoder's weights "
                        "(NAME.TAG, a ViT or a CNN), e.g. the one given to p2_train.py --encoder")
    args = parser.parse_args(argv)
    try:
        check_online()
        offline_reason = None
    except UserError as err:
        offline_reason = str(err)
        print("error: %s" % err, file=sys.stderr)
    summary, failed = [], False
    for part in plan(args):
        print("== %s" % part.name, file=sys.stderr)
        try:
            outcome = get(part, offline_reason)
        except NotReleased as err:
            outcome = "WARNING: not released yet: %s" % err
        except Exception as err:  # every part is tried whatever failed before; the summary names the failure
            outcome, failed = "FAILED: %s" % one_line(err), True
        summary.append("%s: %s" % (part.name, outcome))
    print("\n".join(["hw3_download summary:"] + ["  " + line for line in summary]))
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
