"""Durable file primitives and path checks shared by the storage back ends.

"Durable" means the bytes and the directory entry naming them reach the disk
before the call returns: write a temp file, fsync it, rename it over the
target, fsync the directory. A crash leaves either the old file, the new one,
or a stray temp file that `sweep_temp_files` removes at the next open.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from pathlib import Path
from typing import IO, TypeGuard

from ..contract import IMAGE_SUFFIXES
from ..errors import StoreError

# User and image ids become path components: no dots, no separators, so no
# "..", no hidden names, nothing that can leave the store's root.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")

# Temp files start with a dot, which no valid id does, so they never collide
# with a stored name and a sweep can tell them apart.
_TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


def check_id(kind: str, value: object) -> str:
    """Return `value` if it is a safe id (`^[A-Za-z0-9_-]{1,128}$`); else raise ValueError."""
    if not is_id(value):
        raise ValueError(f"invalid {kind}: {value!r}; expected 1-128 of A-Z a-z 0-9 _ -")
    return value


def is_id(value: object) -> TypeGuard[str]:
    """True if `value` is a safe id (the test `check_id` applies)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def check_suffix(suffix: object) -> str:
    """Return `suffix` if it is one of IMAGE_SUFFIXES; else raise ValueError."""
    if not isinstance(suffix, str) or suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"invalid image suffix: {suffix!r}; expected one of {', '.join(IMAGE_SUFFIXES)}")
    return suffix


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: Path) -> None:
    """Create `path` (one level) if missing and make its entry in the parent durable."""
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"not a directory: {path}") from None
        return
    fsync_dir(path.parent)


def temp_path_for(path: Path) -> Path:
    """A fresh temp name next to `path`, recognisable by `is_temp_name`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for names made by `temp_path_for`."""
    return name.startswith(".") and name.endswith(_TEMP_SUFFIX) and name != LOCK_NAME


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` durably and atomically (temp, fsync, rename, fsync dir)."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def append_durable(path: Path, data: bytes) -> None:
    """Append `data` to `path` and fsync; on failure cut the file back to its old size.

    The file and its directory entry are durable when this returns. If the
    rollback itself fails, the partial tail is what `repair_tail` removes.
    """
    created = not path.exists()
    with open(path, "ab") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                f.truncate(start)
                os.fsync(f.fileno())
            raise
    if created:
        fsync_dir(path.parent)


def truncate_durable(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes and fsync."""
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def repair_tail(path: Path) -> bool:
    """Drop a torn last line (bytes after the final newline) left by a crash; True if cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
    truncate_durable(path, data.rfind(b"\n") + 1)
    return True


def remove_durable(paths: list[Path]) -> None:
    """Remove files (missing ones are fine) and fsync their directories."""
    dirs = set()
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            dirs.add(p.parent)
    for d in dirs:
        fsync_dir(d)


def sweep_temp_files(directory: Path) -> int:
    """Remove temp files a crash left in `directory`; return how many."""
    stray = [p for p in directory.iterdir() if is_temp_name(p.name) and p.is_file()]
    remove_durable(stray)
    return len(stray)


def prepare_root(root: Path) -> None:
    """Create `root` if needed and prove it writable with a durable probe file.

    Raises StoreError naming the path: a read-only directory, a file where the
    directory should be, a missing parent that cannot be created.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise NotADirectoryError(f"not a directory: {root}")
        probe = root / ".probe"
        write_atomic(probe, b"ok\n")
        probe.unlink()
    except OSError as e:
        raise StoreError(f"storage root {root} is not a writable directory: {e.strerror or e}") from e


def lock_root(root: Path) -> IO[bytes]:
    """Take an exclusive lock on the store, so two processes never write it at once.

    The kernel releases it when the process dies (kill -9 included); keep the
    returned file open for as long as the store is open.
    """
    path = root / LOCK_NAME
    try:
        f = open(path, "ab")
    except OSError as e:
        raise StoreError(f"cannot open lock file {path}: {e.strerror or e}") from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise StoreError(f"storage root {root} is in use by another process (lock {path})") from e
    return f
