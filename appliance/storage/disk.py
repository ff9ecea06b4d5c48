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
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import StoreError
from . import CASE_ENTRY_TYPES, StoredImage
from . import records as R
from .outbox import JobSpec, commit_jobs, open_outbox
from .crypto import Sealer, envelope_bytes, is_sealed_record
from .files import (
    IMAGE_SUFFIXES,
    append_durable,
    check_id,
    is_id,
    lock_root,
    make_dir,
    prepare_root,
    remove_durable,
    repair_tail,
    sweep_temp_files,
    write_atomic,
)

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

    def to_bytes(self, sealer: Sealer) -> bytes:
        if self.raw is not None:
            return self.raw + b"\n"
        return (sealer.dumps(self.rec) + "\n").encode()


def _parse_line(raw: bytes) -> _Line:
    try:
        rec = json.loads(raw)
    except ValueError:
        return _Line({}, raw, readable=False)
    if not isinstance(rec, dict) or is_sealed_record(rec):
        return _Line({}, raw, readable=False)
    return _Line(rec, raw)


class DiskStore:
    """Per-user folders with metadata.jsonl and case_counter.json; see the module docstring."""

    name = "disk"

    def __init__(
        self, root: Path, *, case_id_start: int = 10000, sealer: Sealer | None = None, outbox: bool = False
    ) -> None:
        self.root = Path(root)
        # Sync on: jobs go to OUTBOX beside the user folders, committed before the data they
        # announce (storage/outbox.py), so a crash can leave a job without data but never the reverse.
        self.outbox_enabled = bool(outbox)
        self.outbox_path = self.outbox_at(self.root)
        self._outbox: sqlite3.Connection | None = None
        self.case_id_start = int(case_id_start)
        self.sealer = sealer or Sealer(None)  # encryption at rest, or pass-through
        self._lock = threading.Lock()
        self._lock_file: IO[bytes] | None = None
        # Kept up to date on every write so stats() never walks the tree.
        self._images = self._cases = self._image_bytes = 0

    @staticmethod
    def outbox_at(root: Path) -> Path:
        """Where a store on `root` keeps its outbox: a database of its own beside the user folders."""
        return Path(root) / OUTBOX

    # -- lifetime -----------------------------------------------------------

    def open(self) -> None:
        """Prove the root writable, then repair what a crash left: torn lines, orphan files, temp files."""
        with self._lock:
            if self._lock_file is not None:
                return
            prepare_root(self.root)
            self._lock_file = lock_root(self.root)
            try:
                sweep_temp_files(self.root)
                self._check_key()
                if self.outbox_enabled:
                    self._outbox = open_outbox(self.outbox_path)
                self._images = self._cases = self._image_bytes = 0
                for user_dir in self._user_dirs():
                    self._recover(user_dir)
            except OSError as e:
                self._release()
                raise StoreError(f"cannot open store {self.root}: {e}") from e
            except BaseException:
                self._release()
                raise

    def close(self) -> None:
        """Release the root's lock (every write was already fsync'd); safe twice."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._outbox is not None:
            with contextlib.suppress(sqlite3.Error):
                self._outbox.close()
            self._outbox = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _enqueue(self, jobs: list[JobSpec]) -> None:
        """Commit outbox jobs before the write they announce."""
        if self._outbox is not None:
            commit_jobs(self._outbox, self.outbox_path, jobs)

    def _case_jobs(self, user_id: str, rec: dict[str, Any]) -> list[JobSpec]:
        """The case record's job and one per image record its take-over changes."""
        return [("case", user_id, rec["case_id"], len(R.dumps(rec)))] + [
            ("image_record", user_id, image_id, 0) for image_id in rec["image_ids"]
        ]

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
    def _using(self, action: str) -> Iterator[None]:
        """Hold the lock on an open store; turn I/O failures into StoreError."""
        with self._lock:
            if self._lock_file is None:
                raise StoreError(f"store {self.root} is not open")
            try:
                yield
            except OSError as e:
                raise StoreError(f"{action} failed in {self.root}: {e}") from e

    def _read(self, user_dir: Path) -> list[_Line]:
        """The user's metadata lines; a torn last line (no newline yet) is not a record."""
        try:
            data = (user_dir / METADATA).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return []
        complete = data[: data.rfind(b"\n") + 1]
        where = user_dir / METADATA
        return [self._parse(raw, f"{where}:{n}") for n, raw in enumerate(complete.split(b"\n"), 1) if raw.strip()]

    def _parse(self, raw: bytes, where: str) -> _Line:
        """One line as a record; an encrypted one decrypted (StoreError naming `where` if it does not)."""
        line = _parse_line(raw)
        if not line.readable and self.sealer.enabled and envelope_bytes(raw) is not None:
            return _Line(self.sealer.loads(raw, where), raw)
        return line

    def _check_key(self) -> None:
        """Refuse a wrong key, or plain and encrypted data mixed (storage/crypto.py)."""
        plain: str | None = None
        sealed: tuple[str, bytes] | None = None
        for user_dir in self._user_dirs():
            try:
                lines = (user_dir / METADATA).read_bytes().split(b"\n")
            except FileNotFoundError:
                lines = []
            for n, raw in enumerate(lines, 1):
                blob = envelope_bytes(raw)
                if blob is not None and sealed is None:
                    sealed = (f"{user_dir / METADATA}:{n}", blob)
                elif blob is None and plain is None and _parse_line(raw).readable and raw.strip():
                    plain = f"{user_dir / METADATA}:{n}"
            for path in sorted(user_dir.iterdir()):
                if plain is None and path.suffix in IMAGE_SUFFIXES and is_id(path.stem):
                    plain = str(path)
                if sealed is None and path.suffix == ".bin" and is_id(path.stem):
                    sealed = (str(path), path.read_bytes())
            if plain is not None and sealed is not None:
                break
        self.sealer.check_root(self.root, plain_data=plain, sealed_sample=sealed)

    def _rewrite(self, user_dir: Path, lines: list[_Line]) -> None:
        write_atomic(user_dir / METADATA, b"".join(line.to_bytes(self.sealer) for line in lines))

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

    # -- case ids -----------------------------------------------------------

    def next_case_id(self, user_id: str) -> str:
        """Allocate the user's next case id ("10000" first); durable before it returns."""
        user_dir = self.root / check_id("user_id", user_id)
        with self._using("allocating a case id"):
            make_dir(user_dir)
            last = self._read_counter(user_dir)
            # max(): a raised case_id_start takes effect; a lowered one never reissues ids.
            issued = self.case_id_start if last is None else max(last + 1, self.case_id_start)
            self._write_counter(user_dir, issued)
        return str(issued)

    def release_case_id(self, user_id: str, case_id: str) -> dict[str, Any]:
        """Give back the most recently issued id when no record uses it (the contract's answer)."""
        user_dir = self.root / check_id("user_id", user_id)
        with self._using("releasing a case id"):
            last = self._read_counter(user_dir)
            if last is None:
                return {"status": "skipped", "reason": "missing_counter"}
            if int(case_id) != last:
                return {"status": "skipped", "reason": "counter_mismatch", "last_case_id": str(last)}
            forms = R.case_id_forms(case_id)
            if any((line.is_image or line.is_case) and line.case_id_in(forms) for line in self._read(user_dir)):
                return {"status": "skipped", "reason": "case_in_use"}
            self._write_counter(user_dir, last - 1)
        return {"status": "ok", "case_id": case_id}

    def raise_case_counter(self, user_id: str, at_least: int) -> bool:
        """Make the user's last issued case id at least `at_least` (never lower); True if it changed."""
        user_dir = self.root / check_id("user_id", user_id)
        with self._using("raising a case counter"):
            last = self._read_counter(user_dir)
            if last is not None and last >= at_least:
                return False
            make_dir(user_dir)
            self._write_counter(user_dir, int(at_least))
        return True

    # -- images -------------------------------------------------------------

    def save_image(self, user_id: str, image: StoredImage, record: dict[str, Any]) -> None:
        """Store the file, then append its record line (the commit point); or neither."""
        user_dir = self.root / check_id("user_id", user_id)
        rec = R.image_record(image, record)
        line = (self.sealer.dumps(rec) + "\n").encode()
        # Encrypted files are named .bin, as the old server named them.
        path = user_dir / f"{image.image_id}{'.bin' if self.sealer.enabled else image.suffix}"
        with self._using(f"saving image {image.image_id}"):
            if any((user_dir / f"{image.image_id}{s}").exists() for s in FILE_SUFFIXES):
                raise StoreError(f"image {image.image_id} of user {user_id} is already stored")
            make_dir(user_dir)
            self._enqueue([("image", user_id, image.image_id, len(image.data) + len(line))])
            try:
                self._write_image_file(path, bytes(image.data))
                self._commit_image_record(user_dir, line)
            except BaseException:
                # Best effort; an orphan left behind is removed at the next open().
                with contextlib.suppress(OSError):
                    remove_durable([path])
                raise
            self._images += 1
            self._image_bytes += len(image.data)

    def _write_image_file(self, path: Path, data: bytes) -> None:
        write_atomic(path, self.sealer.seal(data))

    def _commit_image_record(self, user_dir: Path, line: bytes) -> None:
        """The commit point of a save: the record line, appended and fsync'd."""
        path = user_dir / METADATA
        # Appending after a torn tail would glue the new record to it; a failed
        # append that could not cut itself back is the only way to get one here.
        repair_tail(path)
        append_durable(path, line)

    def list_images(self, user_id: str, case_id: str | None = None) -> list[dict[str, Any]]:
        """Image records of a user (optionally of one case), oldest first."""
        user_dir = self.root / check_id("user_id", user_id)
        with self._using("listing images"):
            lines = self._read(user_dir)
        forms = None if case_id is None else (str(case_id),)
        return [line.rec for line in lines if line.is_image and (forms is None or line.case_id_in(forms))]

    def read_image(self, user_id: str, image_id: str) -> bytes | None:
        """The stored bytes of an image, or None if there is no such image file."""
        user_dir = self.root / check_id("user_id", user_id)
        check_id("image_id", image_id)
        with self._using(f"reading image {image_id}"):
            for suffix in FILE_SUFFIXES:
                path = user_dir / f"{image_id}{suffix}"
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    data = path.read_bytes()
                    return self.sealer.unseal(data, str(path)) if suffix == ".bin" else data
        return None

    def image_record(self, user_id: str, image_id: str) -> dict[str, Any] | None:
        """One image's record as stored now, or None."""
        user_dir = self.root / check_id("user_id", user_id)
        with self._using(f"reading image record {image_id}"):
            lines = self._read(user_dir)
        found = [line.rec for line in lines if line.is_image and line.rec.get("image_id") == image_id]
        return found[-1] if found else None

    def case_record(self, user_id: str, case_id: str) -> dict[str, Any] | None:
        """The case/uncertain/reject record of that case id as stored now, or None."""
        user_dir = self.root / check_id("user_id", user_id)
        with self._using(f"reading case {case_id}"):
            lines = self._read(user_dir)
        found = [line.rec for line in lines if line.is_case and line.case_id_in((str(case_id),))]
        return found[-1] if found else None

    # -- case records -------------------------------------------------------

    def log_case(self, user_id: str, record: dict[str, Any]) -> dict[str, Any]:
        """Upsert a case/uncertain/reject record by (user, case_id); image records take it over."""
        user_dir = self.root / check_id("user_id", user_id)
        rec = R.case_record(record)
        forms = (rec["case_id"],)
        with self._using(f"logging case {rec['case_id']}"):
            make_dir(user_dir)
            lines = self._read(user_dir)
            kept = [line for line in lines if not (line.is_case and line.case_id_in(forms))]
            rec["image_ids"] = self._take_over(kept, rec)
            self._enqueue(self._case_jobs(user_id, rec))
            self._rewrite(user_dir, [*kept, _Line(rec)])
            self._cases += 1 - (len(lines) - len(kept))
        return rec

    def update_case(self, user_id: str, case_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Merge `fields` into the latest case/uncertain record of that id; None when there is none."""
        user_dir = self.root / check_id("user_id", user_id)
        forms = (str(case_id),)
        with self._using(f"updating case {case_id}"):
            lines = self._read(user_dir)
            targets = [
                line for line in lines
                if line.is_case and line.rec["entry_type"] in R.UPDATABLE_ENTRY_TYPES and line.case_id_in(forms)
            ]
            if not targets:
                return None
            rec = R.merge_update(targets[-1].rec, fields)
            rec["image_ids"] = self._take_over(lines, rec)
            self._enqueue(self._case_jobs(user_id, rec))
            # Rewritten in place: the record keeps its position in the listing order.
            targets[-1].set(rec)
            self._rewrite(user_dir, lines)
        return rec

    def _take_over(self, lines: list[_Line], case: dict[str, Any]) -> list[str]:
        """Copy the case's status and patient fields into its image lines; return their ids."""
        fields = R.takeover(case)
        images = [line for line in lines if line.is_image and line.case_id_in((case["case_id"],))]
        for line in images:
            line.set({**line.rec, **fields})
        return [line.rec["image_id"] for line in images if line.rec.get("image_id")]

    def list_cases(
        self,
        user_id: str | None,
        *,
        status: str | None,
        limit: int,
        include_uncertain: bool,
        include_rejected: bool,
    ) -> list[dict[str, Any]]:
        """Case records newest first (created_at, then latest written); user_id None: every user's.

        Across users, records with equal `created_at` have no common write order here.
        """
        types = R.listed_entry_types(include_uncertain, include_rejected)
        want = None if status is None else R.status_key(status)
        with self._using("listing cases"):
            dirs = self._user_dirs() if user_id is None else [self.root / check_id("user_id", user_id)]
            found = []
            for user_dir in dirs:
                for pos, line in enumerate(self._read(user_dir)):
                    rec = line.rec
                    if line.is_case and rec["entry_type"] in types and (
                        want is None or R.status_key(rec.get("status")) == want
                    ):
                        found.append((R.created_key(rec), pos, rec))
        found.sort(key=lambda item: item[:2], reverse=True)
        return [rec for _, _, rec in found[: max(int(limit), 0)]]

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
