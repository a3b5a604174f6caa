"""The one atomic writer (files and folders), output checks before work, JSON reading and writing, file hashes."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Iterator, Optional


from hw3.util.errors import UserError


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
        from hw3.util import resources  # here: it imports this module

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
