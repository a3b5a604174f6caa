"""What every script shares: errors for people, the one image loader and image Dataset, the one atomic writer,
progress bars, the device choice and where autocast applies."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
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


def autocast(device, enabled: bool = True):
    """fp16 autocast where it applies, on CUDA when enabled (the 2080 Ti has no bf16); no context otherwise: torch 1.12
    warns at every torch.autocast("cuda") on a machine without CUDA, even a disabled one."""
    import torch

    if enabled and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _output_target(path: str, what: str = "output") -> str:
    """The file a write to `path` replaces: a symlink's target (written through, the link kept); refuses anything
    but a regular file or nothing."""
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isfile(target):
        kind = "a directory" if os.path.isdir(target) else "not a regular file (a device, FIFO or socket)"
        raise UserError("%s %s is %s; give a file path" % (what, path, kind))
    return target


def check_output_file(path: str, what: str = "output") -> None:
    """Before any work: `path` must be a regular file or absent (a symlink counts as its target), and its folder must
    take a new file."""
    target = _output_target(path, what)
    check_writable_dir(os.path.dirname(target), "the folder of %s %s" % (what, path))


def check_writable_dir(folder: str, what: str = "output folder") -> None:
    """Writes a small probe file in `folder`, or, while it does not exist yet, in the nearest folder above it that
    does, so a read-only, full or non-folder output location fails now, in one line, rather than after the work.
    Nothing is created: a refused command leaves no folder behind (its outputs make their folders when written)."""
    existing = os.path.abspath(folder or ".")
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(errno.ENOTDIR, "%s is not a folder" % existing)
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise UserError("cannot write to %s %s: %s" % (what, folder or ".", err.strerror or err)) from None


def check_output_dir(path: str, marker: str, what: str) -> None:
    """Before any work: a folder atomic_dir(path, marker, what) may replace (absent, empty, or holding `marker`), in a
    parent that takes new files."""
    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path)
                                                              or os.path.isfile(os.path.join(path, marker)))):
        raise UserError("%s exists and is not a %s folder (no %s); choose another folder" % (path, what, marker))
    check_writable_dir(os.path.dirname(os.path.abspath(path)), "the parent of %s folder %s" % (what, path))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _plain_open_mode(target: str) -> int:
    """The mode open(target, "w") would leave: an existing file keeps its own, a new one gets 0o666 less the umask."""
    if os.path.isfile(target):
        return os.stat(target).st_mode & 0o7777
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: Optional[str] = "utf-8", newline: Optional[str] = None,
                 what: str = "a file") -> Iterator:
    """Writes `path` through a temporary file in the same folder, renamed into place only on success, so a failed
    run never leaves a half-written output nor destroys an earlier one. The file gets the mode a plain open() would
    give; a symlink is written through (its target is replaced, not the link); a folder, device or FIFO is refused.
    A full disk is one line naming `what`, the folder and its free space."""
    target = _output_target(path)
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=folder)
    except OSError as err:
        raise UserError("cannot write %s: %s" % (path, err.strerror or err)) from None
    try:
        os.chmod(tmp, _plain_open_mode(target))
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding,
                       newline=None if "b" in mode else newline) as f:
            yield f
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        import resources  # here: it imports this module

        if resources.disk_full(err) is not None:  # torch.save hides ENOSPC behind a RuntimeError
            raise UserError(resources.disk_full_line(path, what)) from None
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            raise UserError("cannot write %s: %s" % (path, err.strerror or err)) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str, marker: str, what: str) -> Iterator[str]:
    """Builds a folder in a temporary sibling (yielded) and, if the block succeeds, swaps it in for `path`, so the
    folder appears complete or not at all. An existing `path` is replaced only when it is empty or holds `marker`
    (an earlier folder of the same kind); anything else is refused, so no one's files are deleted by mistake."""
    import shutil

    check_output_dir(path, marker, what)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(path)) + ".", dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())  # what a plain mkdir gives, not mkdtemp's 0o700
    except OSError as err:
        raise UserError("cannot create %s folder %s: %s" % (what, path, err.strerror or err)) from None
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read in 1 MB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str, obj, indent: Optional[int] = 2) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def read_json(path: str, what: str = "JSON file"):
    if not os.path.isfile(path):
        raise UserError("%s not found: %s" % (what, path))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:  # a ValueError too: named apart, so no one hunts for a JSON syntax error
        raise UserError("%s is not UTF-8 text, as JSON must be: %s (byte %d is 0x%02x; a Latin-1 or Windows-1252 "
                        "file? re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8)"
                        % (what, path, err.start, raw[err.start])) from None
    try:
        return json.loads(text)
    except ValueError as err:
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


def config_from_dict(cls, d: dict, what: str):
    """A model config dataclass from its JSON (a checkpoint's): unknown fields refused with a ValueError naming them
    and the known ones; lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError("unknown %s config fields: %s (known: %s)"
                         % (what, ", ".join(unknown), ", ".join(sorted(names))))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
