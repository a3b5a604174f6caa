"""The one image loader: finding images in a folder, opening them safely, and the image Dataset
with its collate function and batch iterator."""
from __future__ import annotations

import os
import warnings
from typing import Callable, Iterator, List, Sequence

from PIL import Image, ImageFile, UnidentifiedImageError

from hw3.util.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(folder: str, what: str = "image folder", recursive: bool = False) -> List[str]:
    """Sorted file names of the images in `folder` (with `recursive`, paths relative to it of the images in it and
    its sub-folders, hidden ones skipped); other files are skipped with one warning naming them."""
    if not os.path.isdir(folder):
        raise UserError("%s not found or not a directory: %s" % (what, folder))
    names = sorted(_files_under(folder) if recursive else
                   (n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))))
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    skipped = [n for n in names if n not in set(images)]
    if skipped:
        shown = ", ".join(skipped[:5]) + (" and %d more" % (len(skipped) - 5) if len(skipped) > 5 else "")
        warnings.warn("skipping %d non-image file(s) in %s: %s" % (len(skipped), folder, shown), stacklevel=2)
    if not images:
        raise UserError("no images (%s) in %s%s" % ("/".join(IMAGE_EXTENSIONS), folder,
                                                    " or its sub-folders" if recursive else ""))
    return images


def _files_under(folder: str) -> Iterator[str]:
    """Paths relative to `folder` of the files in it and its sub-folders, hidden ones left out; linked folders are
    followed once each, so a link back up cannot loop."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                yield os.path.relpath(os.path.join(root, name), folder)


def load_rgb(path: str) -> Image.Image:
    """Opens any image mode (grayscale, 16-bit, palette, RGBA, CMYK...) as 8-bit RGB; transparency goes on white.
    A file that is no image, is damaged, or claims more pixels than PIL's decompression-bomb limit is a UserError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a header claiming ~90M+ pixels
            with Image.open(path) as image:
                image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise UserError("cannot read image %s: %s" % (path, " ".join(str(err).split())[:200])) from None
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

# How a complete file of a format ends (PNG's IEND chunk with its CRC, JPEG's end-of-image marker, GIF's trailer):
# checking the last bytes finds a truncated file without decoding it.
IMAGE_ENDINGS = {"PNG": (b"IEND\xaeB`\x82",), "JPEG": (b"\xff\xd9",), "GIF": (b"\x3b",)}

ENDING_WINDOW = 64  # some writers pad a few bytes after the end marker


def check_image_file(path: str) -> None:
    """A cheap check before hours of work: the header parses (not empty, an image, size within PIL's bomb limit) and,
    for PNG, JPEG and GIF, the file ends as a complete file of its format. Decoding is load_rgb's job."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                kind = image.format
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise UserError("cannot read image %s: %s" % (path, " ".join(str(err).split())[:200])) from None
    endings = IMAGE_ENDINGS.get(kind)
    if endings:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - ENDING_WINDOW))
            tail = f.read()
        if not any(marker in tail for marker in endings):
            raise UserError("image %s is truncated (a %s file ends with %s; this one does not)"
                            % (path, kind, " or ".join(repr(m) for m in endings)))


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
