"""The stage runner under run_all.py: a stage is skipped only when it is done and still true.

Each finished stage leaves a record (OUT/stages/<stage>.json) holding its settings, a fingerprint of every input it
read and of every output it wrote, as DVC's dvc.lock does. Before a skip all three are compared; any difference
reruns the stage and says what changed. Outputs are never deleted ahead of time: a rerun replaces them as it
writes, so a failed rerun leaves the earlier outputs (and its record, which then no longer matches them, so the
next run redoes the stage). One run per OUT folder: an OS-level lock (filelock), held for the whole run and released
by the OS when the process dies, so a lock left by a killed run is simply taken over.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from typing import Dict, Iterable, List, Optional

from hw3.util.errors import UserError
from hw3.util.files import check_writable_dir, read_json, write_json

RECORD_FORMAT = "hw3-stage/2"
LOCK_NAME = ".run_all.lock"
OWNER_NAME = ".run_all.owner.json"
HASHED_SUFFIXES = (".json", ".csv", ".txt", ".md")  # small text files: fingerprinted by content
HASH_LIMIT = 64 << 20  # larger files (weights, images) are fingerprinted by size and modification time
# Temporaries of common.atomic_write (".name.XXXXXXXX.tmp") and common.atomic_dir (".name.XXXXXXXX"): mkstemp and
# mkdtemp add 8 characters of [a-z0-9_].
RECORD_FIELDS = dict(format=str, settings=dict, inputs=dict, outputs=dict, seconds=(int, float), results=dict)
TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp)?$")


# ----------------------------------------------------------------------------------------------- fingerprints

def _file_fingerprint(path: str) -> str:
    stat = os.stat(path)
    if path.endswith(HASHED_SUFFIXES) and stat.st_size <= HASH_LIMIT:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return "sha256:" + digest.hexdigest()[:32]
    return "stat:%d:%d" % (stat.st_size, stat.st_mtime_ns)


def fingerprint(path: str) -> Optional[str]:
    """A short string that changes when the file (or any file below the folder) changes; None when absent."""
    if os.path.isfile(path):
        return _file_fingerprint(path)
    if not os.path.isdir(path):
        return None
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            stat = os.stat(full)
            entries.append("%s:%d:%d" % (os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return "folder:%d:%s" % (len(entries), hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()[:32])


def fingerprints(paths: Iterable[str], root: str = "") -> Dict[str, Optional[str]]:
    """{path as given: fingerprint}; `root` is prefixed for reading (outputs are named relative to OUT)."""
    return {p: fingerprint(os.path.join(root, p) if root else p) for p in paths}


# ----------------------------------------------------------------------------------------------- records

def record_path(out: str, stage: str) -> str:
    return os.path.join(out, "stages", re.sub(r"[^A-Za-z0-9_.-]", "-", stage) + ".json")


def read_record(out: str, stage: str) -> Optional[dict]:
    """The stage's record, or None (absent, or written by an older runner without fingerprints). A record that cannot
    be read or has the wrong shape comes back as {"damaged": why}: not done, so the stage is redone (never a
    traceback, and --force always works)."""
    path = record_path(out, stage)
    if not os.path.isfile(path):
        return None
    try:
        record = read_json(path, "stage record")
    except UserError as err:
        return dict(damaged=str(err))
    if isinstance(record, dict) and "format" in record and record["format"] != RECORD_FORMAT:
        return None
    wrong = record_shape_error(record)
    return dict(damaged="stage record %s %s" % (path, wrong)) if wrong else record


def record_shape_error(record) -> Optional[str]:
    """What is wrong with a stage record's shape, in words; None when it has the shape write_record gives it."""
    if not isinstance(record, dict):
        return "holds %s, not an object" % type(record).__name__
    for key, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            return "has no %s %s" % (key, kind[0].__name__ if isinstance(kind, tuple) else kind.__name__)
    for key in ("inputs", "outputs"):
        if not all(v is None or isinstance(v, str) for v in record[key].values()):
            return "has %s that are not fingerprints" % key
    return None


def write_record(out: str, stage: str, settings: dict, inputs: Dict[str, Optional[str]], outputs: List[str],
                 seconds: float, results: dict) -> None:
    write_json(record_path(out, stage), dict(format=RECORD_FORMAT, stage=stage, settings=settings, inputs=inputs,
                                             outputs=fingerprints(outputs, out), seconds=seconds, results=results))


def _changed_settings(old: dict, new: dict) -> List[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def why_rerun(record: Optional[dict], out: str, settings: dict, inputs: Dict[str, Optional[str]]) -> Optional[str]:
    """None when the finished stage is still true (same settings, inputs unchanged, outputs there and unchanged);
    otherwise the first reason, in words."""
    if record is None:
        return "not run before"
    if "damaged" in record:
        return "its record is damaged, so it counts as not done (%s)" % record["damaged"]
    if record.get("settings") != settings:
        return "settings changed (%s)" % ", ".join(_changed_settings(record.get("settings") or {}, settings))
    old_inputs = record.get("inputs") or {}
    changed = [p for p in sorted(set(old_inputs) | set(inputs)) if old_inputs.get(p) != inputs.get(p)]
    if changed:
        return "input changed: %s" % ", ".join(changed[:3]) + (" and %d more" % (len(changed) - 3)
                                                              if len(changed) > 3 else "")
    for path, old in (record.get("outputs") or {}).items():
        now = fingerprint(os.path.join(out, path))
        if now is None:
            return "output %s is missing" % path
        if now != old:
            return "output %s changed since the stage finished" % path
    return None


def skip_line(record: dict) -> str:
    return "done earlier (%.0f s) and still true: same settings, %d input(s) and %d output(s) unchanged" % (
        record.get("seconds", 0), len(record.get("inputs") or {}), len(record.get("outputs") or {}))


# ----------------------------------------------------------------------------------------------- the folder

class RunLock:
    """One run per OUT: filelock's OS lock on OUT/.run_all.lock, with a note of who holds it for the refusal."""

    def __init__(self, out: str, command: str):
        import filelock

        self.out, self.command = out, command
        self.lock = filelock.FileLock(os.path.join(out, LOCK_NAME))
        self.timeout = filelock.Timeout

    def __enter__(self):
        try:
            self.lock.acquire(timeout=0)
        except self.timeout:
            owner = {}
            try:
                owner = read_json(os.path.join(self.out, OWNER_NAME))
            except UserError:
                pass
            raise UserError("another run_all.py is running on %s (pid %s on %s, started %s: %s); wait for it to end "
                            "or choose another --out" % (self.out, owner.get("pid", "?"), owner.get("host", "?"),
                                                         owner.get("started", "?"), owner.get("command", "?")))
        write_json(os.path.join(self.out, OWNER_NAME), dict(pid=os.getpid(), host=socket.gethostname(),
                                                            started=time.strftime("%Y-%m-%d %H:%M:%S"),
                                                            command=self.command))
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


def remove_temporaries(out: str) -> List[str]:
    """Hidden temporaries that a killed run left in OUT (half-written files, half-built folders), removed under the
    lock, when no other run can be writing them. Returns their paths relative to OUT."""
    removed = []
    for root, dirs, files in os.walk(out):
        for name in list(dirs):
            if TEMPORARY.match(name):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                dirs.remove(name)
                removed.append(os.path.relpath(os.path.join(root, name), out))
        for name in files:
            if TEMPORARY.match(name) and name not in (LOCK_NAME, OWNER_NAME):
                os.remove(os.path.join(root, name))
                removed.append(os.path.relpath(os.path.join(root, name), out))
    return sorted(removed)


def check_out_folder(out: str) -> None:
    """OUT must be a folder or absent, in a place that takes files: checked before any work."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError("--out %s is a file, not a folder; give a folder path" % out)
    check_writable_dir(out, "--out folder")


def local_path(path: str, out: str, data: str = "") -> str:
    """A path as records and results.json name it (<OUT>/..., <DATA>/...) in these folders; others as they are."""
    for name, folder in (("<OUT>", out), ("<DATA>", data)):
        if folder and (path == name or path.startswith(name + os.sep)):
            return folder + path[len(name):]
    return path


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]
