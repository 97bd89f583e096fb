"""Atomic writes, for every file and folder ftune writes: a temporary name of its own in the same folder (never
a name a user's file could have), renamed into place when complete, removed when not.

What ftune writes gets the modes the user's umask gives a new file or folder (0644 and 0755 under umask 022),
also where a library wrote a file 0600 (safetensors does). A temporary's name carries its process id, and the
process holds a flock on it while writing: a later write to the same target removes the temporaries a killed
process left (a half-written GGUF), never a running one's."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _temporary(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to open()
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(data)
            f.flush()
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_text(path: Path):
    """A text stream to write `path` through, line by line (output larger than memory): renamed into place when
    the body finishes, removed when it fails, so a half-written file never carries the name."""
    path = Path(path)
    tmp = _temporary(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield f
            f.flush()
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def temporary_folder(target: Path):
    """A new empty folder beside `target` (created parents included) to write into; removed afterwards unless
    the body renamed it into place (with `replace_folder`, or after `umask_modes`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target, "tmp")
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def replace_folder(tmp: Path, target: Path) -> None:
    """Put a finished temporary folder in place of `target` (an old one moved aside, then deleted)."""
    umask_modes(tmp)
    if target.exists():
        old = _temporary(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def umask_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes the umask gives a new file or folder (set-group-ID and
    executable bits kept)."""
    mask = umask()
    for root, _, names in os.walk(folder):
        for path in (root, *(os.path.join(root, name) for name in names)):
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue
            full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
            os.chmod(path, (stat.S_IMODE(mode) & 0o7000) | (full & ~mask))


def umask() -> int:
    """The process's umask, read without changing it where the kernel shows it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # elsewhere set and restored: meanwhile a new file could only be stricter
    os.umask(mask)
    return mask


def _temporary(target: Path, kind: str) -> Path:
    """A new name beside `target` for its temporary ("tmp") or for the old one moved aside ("old"), carrying our
    process id; the temporaries of `target` that dead processes left are removed first."""
    _remove_stale(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_stale(target: Path) -> None:
    ours = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")
    for entry in target.parent.iterdir():
        found = ours.fullmatch(entry.name)
        if found and not entry.is_symlink() and not _running(int(found[1])):
            _remove_unlocked(entry)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_unlocked(entry: Path) -> None:
    """Remove a temporary unless its flock is held (by a writer on another machine sharing the folder)."""
    try:
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)
