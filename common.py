"""What every script shares: errors for people, the one image loader and image Dataset, the one atomic writer,
progress bars, the device choice."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from typing import Callable, Iterator, List, Optional, Sequence

from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class UserError(Exception):
    """A problem with the user's input: printed as one line naming the file or argument, without a traceback."""


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Runs a script's main(), turning a UserError into `error: ...` on stderr and exit status 2."""
    try:
        code = main()
    except UserError as err:
        print("error: %s" % err, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def list_images(folder: str, what: str = "image folder") -> List[str]:
    """Sorted file names of the images in `folder`; other files are skipped with one warning naming them."""
    if not os.path.isdir(folder):
        raise UserError("%s not found or not a directory: %s" % (what, folder))
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    skipped = [n for n in names if n not in set(images)]
    if skipped:
        shown = ", ".join(skipped[:5]) + (" and %d more" % (len(skipped) - 5) if len(skipped) > 5 else "")
        warnings.warn("skipping %d non-image file(s) in %s: %s" % (len(skipped), folder, shown), stacklevel=2)
    if not images:
        raise UserError("no images (%s) in %s" % ("/".join(IMAGE_EXTENSIONS), folder))
    return images


def load_rgb(path: str) -> Image.Image:
    """Opens any image mode (grayscale, 16-bit, palette, RGBA, CMYK...) as 8-bit RGB; transparency goes on white."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UserError("cannot read image %s: %s" % (path, err)) from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256.0).convert("L")  # 16-bit to 8-bit keeps the full range
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageFiles:
    """A Dataset of image files through a transform: (index, pixels, error). A file that cannot be read comes back as
    its error message (pixels None), so the main process names it in one line instead of a worker's traceback."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_rgb(self.paths[index])), ""
        except UserError as err:
            return index, None, str(err)


def collate_images(items):
    """DataLoader collate for ImageFiles: (indices, pixels (B, ...) or None, error messages)."""
    import torch

    errors = [error for _, _, error in items if error]
    if errors:
        return [i for i, _, _ in items], None, errors
    return [i for i, _, _ in items], torch.stack([pixels for _, pixels, _ in items]), []


def image_batches(loader) -> Iterator:
    """(indices, pixels) from a DataLoader over ImageFiles; the first batch holding an unreadable image stops the
    run with one line naming it."""
    for indices, pixels, errors in loader:
        if errors:
            raise UserError(errors[0] + (" (and %d more unreadable images)" % (len(errors) - 1) if len(errors) > 1
                                         else ""))
        yield indices, pixels


def resolve_device(name: Optional[str] = None):
    """The torch device for a --device option: None or "auto" = cuda if available, else cpu."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError("--device %r is not a torch device (cpu, cuda, cuda:0...)" % name) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device %s asked for, but torch sees no CUDA GPU here" % name)
    return device


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: Optional[str] = "utf-8", newline: Optional[str] = None) -> Iterator:
    """Writes `path` through a temporary file in the same folder, renamed into place only on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding,
                       newline=None if "b" in mode else newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str, marker: str, what: str) -> Iterator[str]:
    """Builds a folder in a temporary sibling (yielded) and, if the block succeeds, swaps it in for `path`, so the
    folder appears complete or not at all. An existing `path` is replaced only when it is empty or holds `marker`
    (an earlier folder of the same kind); anything else is refused, so no one's files are deleted by mistake."""
    import shutil

    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path)
                                                              or os.path.isfile(os.path.join(path, marker)))):
        raise UserError("%s exists and is not a %s folder (no %s); choose another folder" % (path, what, marker))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(path)) + ".", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj, indent: Optional[int] = 2) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def read_json(path: str, what: str = "JSON file"):
    if not os.path.isfile(path):
        raise UserError("%s not found: %s" % (what, path))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError("%s is not valid JSON: %s (%s)" % (what, path, err)) from None


def hub_offline(offline: Optional[bool] = None) -> bool:
    """Whether model-hub downloads are off (HF_HUB_OFFLINE); `offline` sets it, also in an already imported hub, so a
    missing weight file fails at once instead of waiting on a network that is not there."""
    if offline is not None:
        os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None and hasattr(constants, "HF_HUB_OFFLINE"):
            constants.HF_HUB_OFFLINE = offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def progress(iterable=None, **kwargs):
    """The project's progress bar: tqdm on stderr, so stdout keeps only results."""
    from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)
