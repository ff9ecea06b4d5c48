"""The old server's on-disk layout, written crash-safely, for clinics whose tools read it.

Layout under the root::

    <user_id>/<image_id>.jpg|.png|.webp
    <user_id>/metadata.jsonl       one JSON record a line; case records carry entry_type
    <user_id>/case_counter.json    {"last_case_id": 10002}
    outbox.db                      the sync outbox, only with sync on (storage/outbox.py)

Crash safety: an image file lands (temp, fsync, rename, fsync dir) before its
record line is appended and fsync'd, so the line is the commit point; at open
a torn last line is cut off and an image file without a record line removed.
Upserts and updates rewrite metadata.jsonl atomically, as does the counter.
Lines this store cannot read (damage) are kept byte for byte and make the
open-time sweep leave that user's image files alone, since it cannot tell
which of them have records.

With encryption on (storage/crypto.py) images are `<image_id>.bin` and every
line is `{"enc": ..., "v": 1}`, the old server's encrypted format; a line that
does not decrypt stops the store from opening, naming its file and line.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..contract import IMAGE_SUFFIXES
from ..errors import StoreError
from . import CASE_ENTRY_TYPES, StoredImage
from . import records as R
from .base import EVERY_CASE, BaseStore, CaseQuery, CaseRow, Row
from .crypto import Sealer, envelope_bytes, image_binding, is_sealed_record
from .files import (
    append_durable,
    check_id,
    is_id,
    make_dir,
    remove_durable,
    repair_tail,
    sweep_temp_files,
    write_atomic,
)
from .outbox import JobSpec, commit_jobs, open_outbox

METADATA = "metadata.jsonl"
COUNTER = "case_counter.json"
OUTBOX = "outbox.db"  # not an id (it has a dot), so never taken for a user folder
# Image file names this store reads: the plain kinds, and .bin when encrypted.
FILE_SUFFIXES = (*IMAGE_SUFFIXES, ".bin")


@dataclass
class _Line:
    """One line of metadata.jsonl: the record, and its bytes while it is unchanged."""

    rec: dict[str, Any]
    raw: bytes | None = None  # None once `rec` changed: written from `rec`
    readable: bool = True  # False: encrypted or damaged; `raw` is kept as is, `rec` is {}

    @property
    def is_image(self) -> bool:
        return self.readable and "entry_type" not in self.rec

    @property
    def is_case(self) -> bool:
        return self.readable and self.rec.get("entry_type") in CASE_ENTRY_TYPES

    def case_id_in(self, forms: tuple[str, ...]) -> bool:
        return self.readable and str(self.rec.get("case_id")) in forms

    def set(self, rec: dict[str, Any]) -> None:
        self.rec, self.raw = rec, None

    def to_bytes(self, sealer: Sealer, user_id: str) -> bytes:
        if self.raw is not None:
            return self.raw + b"\n"
        return (sealer.dumps(self.rec, user_id) + "\n").encode()


def _parse_line(raw: bytes) -> _Line:
    try:
        rec = json.loads(raw)
    except ValueError:
        return _Line({}, raw, readable=False)
    if not isinstance(rec, dict) or is_sealed_record(rec):
        return _Line({}, raw, readable=False)
    return _Line(rec, raw)


class DiskStore(BaseStore):
    """Per-user folders with metadata.jsonl and case_counter.json; see the module docstring."""

    name = "disk"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        # Sync on: jobs go to OUTBOX beside the user folders, committed before the data they
        # announce (storage/outbox.py), so a crash can leave a job without data but never the reverse.
        self._outbox: sqlite3.Connection | None = None
        # Kept up to date on every write so stats() never walks the tree.
        self._images = self._cases = self._image_bytes = 0

    @staticmethod
    def outbox_at(root: Path) -> Path:
        """Where a store on `root` keeps its outbox: a database of its own beside the user folders."""
        return Path(root) / OUTBOX

    # -- lifetime -----------------------------------------------------------

    def _open_root(self) -> None:
        """Repair what a crash left (torn lines, orphan files, temp files) and count what is there."""
        sweep_temp_files(self.root)
        self._check_key()
        if self.outbox_enabled:
            self._outbox = open_outbox(self.outbox_path)
        self._images = self._cases = self._image_bytes = 0
        for user_dir in self._user_dirs():
            self._recover(user_dir)

    def _close_root(self) -> None:
        """Close the outbox (every write was already fsync'd)."""
        if self._outbox is not None:
            with contextlib.suppress(sqlite3.Error):
                self._outbox.close()
            self._outbox = None

    def _enqueue(self, jobs: list[JobSpec]) -> None:
        """Commit outbox jobs before the write they announce."""
        if self._outbox is not None and jobs:
            commit_jobs(self._outbox, self.outbox_path, jobs)

    def _user_ids(self) -> list[str]:
        return [p.name for p in self._user_dirs()]

    def _image_file(self, user_id: str, image_id: str) -> Path | None:
        path = self.root / user_id / f"{image_id}.bin"
        return path if path.is_file() else None

    def _user_dirs(self) -> list[Path]:
        # Anything whose name is not a valid user id (lost+found, the lock) is not ours.
        return sorted(p for p in self.root.iterdir() if is_id(p.name) and p.is_dir())

    def _recover(self, user_dir: Path) -> None:
        """Undo a crashed write in one user's folder and count what is there."""
        sweep_temp_files(user_dir)
        repair_tail(user_dir / METADATA)
        lines = self._read(user_dir)
        files = [p for p in user_dir.iterdir() if p.suffix in FILE_SUFFIXES and is_id(p.stem) and p.is_file()]
        if all(line.readable for line in lines):
            recorded = {line.rec["image_id"] for line in lines if line.is_image and "image_id" in line.rec}
            orphans = [p for p in files if p.stem not in recorded]
            remove_durable(orphans)
            files = [p for p in files if p.stem in recorded]
        self._images += sum(line.is_image for line in lines)
        self._cases += sum(line.is_case for line in lines)
        self._image_bytes += sum(p.stat().st_size for p in files)

    # -- plumbing -----------------------------------------------------------

    @contextlib.contextmanager
    def _section(self, user_id: str | None, write: bool) -> Iterator[_Records]:
        records = _Records(self, user_id)
        yield records
        if write:
            records.commit()

    def _read(self, user_dir: Path) -> list[_Line]:
        """The user's metadata lines; a torn last line (no newline yet) is not a record."""
        try:
            data = (user_dir / METADATA).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return []
        complete = data[: data.rfind(b"\n") + 1]
        where = user_dir / METADATA
        user_id = user_dir.name
        return [
            self._parse(raw, f"{where}:{n}", user_id) for n, raw in enumerate(complete.split(b"\n"), 1) if raw.strip()
        ]

    def _parse(self, raw: bytes, where: str, user_id: str) -> _Line:
        """One line of `user_id`'s as a record; an encrypted one decrypted (StoreError naming `where` if it does not)."""
        line = _parse_line(raw)
        if not line.readable and self.sealer.enabled and envelope_bytes(raw, user_id) is not None:
            return _Line(self.sealer.loads(raw, where, user_id), raw)
        return line

    def _key_evidence(self) -> tuple[str | None, tuple[str, bytes, bytes | None] | None]:
        plain: str | None = None
        sealed: tuple[str, bytes, bytes | None] | None = None
        for user_dir in self._user_dirs():
            try:
                lines = (user_dir / METADATA).read_bytes().split(b"\n")
            except FileNotFoundError:
                lines = []
            for n, raw in enumerate(lines, 1):
                sample = envelope_bytes(raw, user_dir.name)
                if sample is not None and sealed is None:
                    sealed = (f"{user_dir / METADATA}:{n}", *sample)
                elif sample is None and plain is None and _parse_line(raw).readable and raw.strip():
                    plain = f"{user_dir / METADATA}:{n}"
            for path in sorted(user_dir.iterdir()):
                if plain is None and path.suffix in IMAGE_SUFFIXES and is_id(path.stem):
                    plain = str(path)
                if sealed is None and path.suffix == ".bin" and is_id(path.stem):
                    sealed = (str(path), path.read_bytes(), image_binding(user_dir.name, path.stem))
            if plain is not None and sealed is not None:
                break
        return plain, sealed

    def _rewrite(self, user_dir: Path, lines: list[_Line]) -> None:
        write_atomic(user_dir / METADATA, b"".join(line.to_bytes(self.sealer, user_dir.name) for line in lines))

    def _read_counter(self, user_dir: Path) -> int | None:
        path = user_dir / COUNTER
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return int(json.loads(data)["last_case_id"])
        except (ValueError, TypeError, KeyError) as e:
            # Guessing could hand out an id twice: refuse instead.
            raise StoreError(f"{path}: unreadable case counter ({e!r}); expected {{\"last_case_id\": <int>}}") from e

    def _write_counter(self, user_dir: Path, last: int) -> None:
        write_atomic(user_dir / COUNTER, json.dumps({"last_case_id": last}).encode())

    # -- images -------------------------------------------------------------

    def save_image(self, user_id: str, image: StoredImage, record: dict[str, Any]) -> None:
        """Store the file, then append its record line (the commit point); or neither."""
        user_dir = self.root / check_id("user_id", user_id)
        rec = R.image_record(image, record)
        line = (self.sealer.dumps(rec, user_id) + "\n").encode()
        # Encrypted files are named .bin, as the old server named them.
        path = user_dir / f"{image.image_id}{'.bin' if self.sealer.enabled else image.suffix}"
        with self._using(f"saving image {image.image_id}"):
            if any((user_dir / f"{image.image_id}{s}").exists() for s in FILE_SUFFIXES):
                raise StoreError(f"image {image.image_id} of user {user_id} is already stored")
            make_dir(user_dir)
            self._enqueue([("image", user_id, image.image_id, len(image.data) + len(line))])
            try:
                self._write_image_file(path, bytes(image.data), image_binding(user_id, image.image_id))
                self._commit_image_record(user_dir, line)
            except BaseException:
                # Best effort; an orphan left behind is removed at the next open().
                with contextlib.suppress(OSError):
                    remove_durable([path])
                raise
            self._images += 1
            self._image_bytes += len(image.data)

    def _write_image_file(self, path: Path, data: bytes, ad: bytes) -> None:
        write_atomic(path, self.sealer.seal(data, ad))

    def _commit_image_record(self, user_dir: Path, line: bytes) -> None:
        """The commit point of a save: the record line, appended and fsync'd."""
        path = user_dir / METADATA
        # Appending after a torn tail would glue the new record to it; a failed
        # append that could not cut itself back is the only way to get one here.
        repair_tail(path)
        append_durable(path, line)

    def read_image(self, user_id: str, image_id: str) -> bytes | None:
        """The stored bytes of an image, or None if there is no such image file."""
        user_dir = self.root / check_id("user_id", user_id)
        check_id("image_id", image_id)
        with self._using(f"reading image {image_id}"):
            for suffix in FILE_SUFFIXES:
                path = user_dir / f"{image_id}{suffix}"
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    data = path.read_bytes()
                    ad = image_binding(user_id, image_id)
                    return self.sealer.unseal(data, str(path), ad) if suffix == ".bin" else data
        return None

    # -- status -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Backend, root, record counts and image bytes, kept current in memory since open()."""
        with self._using("reading store stats"):
            return {
                "backend": self.name,
                "root": str(self.root),
                "images": self._images,
                "cases": self._cases,
                "image_bytes": self._image_bytes,
            }


class _Records:
    """One user's metadata lines and counter, read on first use and written back at commit."""

    def __init__(self, store: DiskStore, user_id: str | None) -> None:
        self.store, self.user_id = store, user_id
        self.user_dir = store.root / user_id if user_id is not None else store.root
        self._lines: list[_Line] | None = None
        self._counter: int | None = None
        self._counter_read = False
        self._lines_changed = self._counter_changed = False
        self._jobs: list[JobSpec] = []
        self._cases_delta = 0

    @property
    def lines(self) -> list[_Line]:
        if self._lines is None:
            self._lines = self.store._read(self.user_dir)
        return self._lines

    def counter(self) -> int | None:
        if not self._counter_read:
            self._counter, self._counter_read = self.store._read_counter(self.user_dir), True
        return self._counter

    def set_counter(self, last: int) -> None:
        self._counter, self._counter_read, self._counter_changed = last, True, True

    def images(self, case_id: str | None = None) -> list[Row]:
        return [
            Row(line, line.rec) for line in self.lines
            if line.is_image and (case_id is None or line.case_id_in((case_id,)))
        ]

    def image(self, image_id: str) -> Row | None:
        found = [Row(line, line.rec) for line in self.lines if line.is_image and line.rec.get("image_id") == image_id]
        return found[-1] if found else None

    def cases(self, case_id: str) -> list[Row]:
        return [Row(line, line.rec) for line in self.lines if line.is_case and line.case_id_in((case_id,))]

    def case_rows(self, query: CaseQuery = EVERY_CASE) -> list[CaseRow]:
        dirs = self.store._user_dirs() if self.user_id is None else [self.user_dir]
        # Across users, records with equal `created_at` have no common write order here.
        return query.pick([
            CaseRow((R.created_key(line.rec), pos), line.rec["entry_type"], R.status_key(line.rec.get("status")),
                    _loader(line.rec))
            for user_dir in dirs
            for pos, line in enumerate(self.store._read(user_dir))
            if line.is_case
        ])

    def put_image(self, row: Row) -> None:
        row.key.set(row.record)
        self._lines_changed = True

    put_case = put_image  # a line is rewritten in place either way, keeping its position

    def add_case(self, record: dict[str, Any]) -> None:
        self.lines.append(_Line(record))
        self._lines_changed, self._cases_delta = True, self._cases_delta + 1

    def delete_case(self, row: Row) -> None:
        self.lines.remove(row.key)
        self._lines_changed, self._cases_delta = True, self._cases_delta - 1

    def enqueue(self, kind: str, ref: str, size_bytes: int) -> None:
        assert self.user_id is not None
        self._jobs.append((kind, self.user_id, ref, size_bytes))

    def commit(self) -> None:
        """Write what changed: outbox jobs first (never later than their data), then counter and lines."""
        self.store._enqueue(self._jobs)
        if self._counter_changed or self._lines_changed:
            make_dir(self.user_dir)
        if self._counter_changed:
            assert self._counter is not None
            self.store._write_counter(self.user_dir, self._counter)
        if self._lines_changed:
            self.store._rewrite(self.user_dir, self.lines)
            self.store._cases += self._cases_delta


def _loader(rec: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A record already read, as a CaseRow's loader."""
    return lambda: rec
