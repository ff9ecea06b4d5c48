"""What every store shares: the root and its lock, open/close, the key check, and the atomic section.

A back end subclasses `BaseStore` and supplies its own I/O: `_open_root`,
`_close_root`, `_key_evidence`, `_section` (a `Records` view of one user's
counter and records, or of every user's case records), `save_image`,
`read_image` and `stats`. The contract's rules over those primitives live
once, in appliance/cases.py.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from ..errors import StoreError
from .crypto import Sealer, image_binding
from .files import check_id, lock_root, prepare_root, write_atomic

if TYPE_CHECKING:
    from ..buckets.config import BucketConfig
    from .config import StorageConfig


@dataclass
class Row:
    """One stored record and the back end's handle on where it lives (seq, line)."""

    key: Any
    record: dict[str, Any]


@dataclass(frozen=True)
class CaseRow:
    """A case record as listings filter and order it, its body loaded only when picked."""

    order: tuple[str, int]  # (created_at, write order): newest first is the largest
    entry_type: str
    status_key: str  # records.status_key of its status
    load: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class CaseQuery:
    """Which case records a listing wants: entry types, a status (casefolded), at most `limit`, newest first.

    The SQL back ends run it in the database (`where`); the disk store picks in Python (`pick`).
    """

    entry_types: tuple[str, ...] | None = None  # None: every entry type
    status_key: str | None = None  # records.status_key of the status wanted; None: any
    limit: int | None = None  # None: all

    def where(self, user_id: str | None, mark: str) -> tuple[str, list[Any]]:
        """The WHERE clause (or "") and its parameters, with `mark` as the placeholder ("?" or "%s")."""
        terms: list[str] = []
        params: list[Any] = []
        if user_id is not None:
            terms.append(f"user_id = {mark}")
            params.append(user_id)
        if self.entry_types is not None:
            terms.append(f"entry_type IN ({', '.join([mark] * len(self.entry_types))})")
            params.extend(self.entry_types)
        if self.status_key is not None:
            terms.append(f"status_key = {mark}")
            params.append(self.status_key)
        return (" WHERE " + " AND ".join(terms) if terms else ""), params

    def pick(self, rows: list[CaseRow]) -> list[CaseRow]:
        """The rows the query wants, newest first, from every row of the section."""
        wanted = [row for row in rows if (self.entry_types is None or row.entry_type in self.entry_types)
                  and (self.status_key is None or row.status_key == self.status_key)]
        wanted.sort(key=lambda row: row.order, reverse=True)
        return wanted if self.limit is None else wanted[: max(self.limit, 0)]


EVERY_CASE = CaseQuery()


class Records(Protocol):
    """One user's counter, records and outbox inside an atomic section of a store.

    Opened by `BaseStore.writing` or `BaseStore.reading`; every change made
    through it becomes durable together when the section ends without an error,
    outbox jobs never later than the data they announce. A section over every
    user (user None) offers only `case_rows`.
    """

    def counter(self) -> int | None:
        """The user's last issued case id, or None if none was ever issued."""

    def set_counter(self, last: int) -> None:
        """Make `last` the user's last issued case id."""

    def images(self, case_id: str | None = None) -> list[Row]:
        """Image records (of one case id, spelled exactly so), oldest first."""

    def image(self, image_id: str) -> Row | None:
        """The record of one image, or None."""

    def cases(self, case_id: str) -> list[Row]:
        """Case/uncertain/reject records of that case id (spelled exactly so), in write order."""

    def case_rows(self, query: CaseQuery = EVERY_CASE) -> list[CaseRow]:
        """The case/uncertain/reject records of the section's user (or of every user) `query` wants, newest first."""

    def put_image(self, row: Row) -> None:
        """Write an image record back in place."""

    def put_case(self, row: Row) -> None:
        """Write a case record back in place: it keeps its write order."""

    def add_case(self, record: dict[str, Any]) -> None:
        """Store a new case record, written after every other."""

    def delete_case(self, row: Row) -> None:
        """Remove a case record."""

    def enqueue(self, kind: str, ref: str, size_bytes: int) -> None:
        """Announce (kind, user, ref) and the bytes it will upload to the sync outbox, when the store has one."""


class BaseStore:
    """Root, lock, key check and error handling shared by every back end; see the module docstring.

    Built as `cls(root, *, case_id_start=10000, sealer=None, outbox=False)`; thread-safe.
    """

    name = ""
    # Which worker-side outbox drains this store (appliance/sync): the SQLite file at `outbox_path`.
    outbox_kind = "sqlite"
    # True when image bytes go through an `images.ImagePlace` apart from the records (so may be a bucket).
    images_apart = False

    def __init__(
        self, root: Path, *, case_id_start: int = 10000, sealer: Sealer | None = None, outbox: bool = False
    ) -> None:
        self.root = Path(root)
        self.case_id_start = int(case_id_start)
        # Encryption at rest, or pass-through (storage/crypto.py).
        self.sealer = sealer or Sealer(None)
        # Sync on: every record write also commits its outbox job (storage/outbox.py).
        self.outbox_enabled = bool(outbox)
        self.outbox_path = self.outbox_at(self.root)
        # Every use of the back end's handles holds this lock: one writer at a time.
        self._lock = threading.Lock()
        self._lock_file: IO[bytes] | None = None

    @classmethod
    def describe(cls, storage: StorageConfig) -> str:
        """Where `storage` keeps the data, for `appliance check-config`; ConfigError for what start-up would refuse."""
        return f"{cls.name} at {storage.root}"

    @classmethod
    def configured(cls, storage: StorageConfig, bucket: BucketConfig) -> dict[str, Any]:
        """The constructor options the back end's own [storage] keys set (none but the shared ones here)."""
        return {}

    @staticmethod
    def outbox_at(root: Path) -> Path:
        """Where a store on `root` keeps its sync outbox (known without opening it)."""
        raise NotImplementedError

    # -- what a back end supplies ---------------------------------------------

    def _open_root(self) -> None:
        """Create, migrate or recover the store under the held root lock."""
        raise NotImplementedError

    def _close_root(self) -> None:
        """Release the back end's handles; called on close and on a failed open."""

    def _key_evidence(self) -> tuple[str | None, tuple[str, bytes, bytes | None] | None]:
        """Where plain data was found (or None), and one sealed sample (where, bytes, associated data) or None."""
        raise NotImplementedError

    def _section(self, user_id: str | None, write: bool) -> contextlib.AbstractContextManager[Records]:
        """The back end's `Records` for one user (or every user), committed when it ends."""
        raise NotImplementedError

    def _user_ids(self) -> list[str]:
        """Every user that has records or a counter (under the held lock)."""
        raise NotImplementedError

    def _image_file(self, user_id: str, image_id: str) -> Path | None:
        """Where an image's encrypted file is, or None (under the held lock)."""
        raise NotImplementedError

    @property
    def _label(self) -> str:
        """What open errors name: the root, or the file that is the store."""
        return str(self.root)

    # -- lifetime ---------------------------------------------------------------

    def open(self) -> None:
        """Take the root's lock, prove it writable, then let the back end create or recover it."""
        with self._lock:
            if self._lock_file is not None:
                return
            prepare_root(self.root)
            self._lock_file = lock_root(self.root)
            try:
                self._open_root()
            except (OSError, sqlite3.Error) as e:
                self._release()
                raise StoreError(f"cannot open store {self._label}: {e}") from e
            except BaseException:
                self._release()
                raise

    def close(self) -> None:
        """Flush and release everything; safe to call twice."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        self._close_root()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _check_key(self) -> None:
        """Refuse a wrong key, or plain and encrypted data mixed (storage/crypto.py)."""
        plain, sealed = self._key_evidence()
        self.sealer.check_root(self.root, plain_data=plain, sealed_sample=sealed)

    @contextlib.contextmanager
    def _using(self, action: str) -> Iterator[None]:
        """Hold the lock on an open store; turn I/O and SQLite failures into StoreError."""
        with self._lock:
            if self._lock_file is None:
                raise StoreError(f"store {self.root} is not open")
            try:
                yield
            except (OSError, sqlite3.Error) as e:
                raise StoreError(f"{action} failed in {self.root}: {e}") from e

    # -- atomic sections ----------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, user_id: str, action: str) -> Iterator[Records]:
        """An atomic read-modify-write section over one user's counter, records and outbox."""
        check_id("user_id", user_id)
        with self._using(action), self._section(user_id, True) as records:
            yield records

    @contextlib.contextmanager
    def reading(self, user_id: str | None, action: str) -> Iterator[Records]:
        """A read-only section over one user (or, for None, every user's case records)."""
        if user_id is not None:
            check_id("user_id", user_id)
        with self._using(action), self._section(user_id, False) as records:
            yield records

    def users(self) -> list[str]:
        """Every user that has records or a counter, sorted (to copy a store user by user)."""
        with self._using("listing users"):
            return sorted(self._user_ids())

    # -- re-encryption ----------------------------------------------------------------

    def reseal(self) -> int:
        """Rewrite every record and image file of an encrypted store as format v2; how many were rewritten.

        For data written in v1 (the old server's, or this appliance's before issue 13). Each
        write is atomic and both formats are read, so an interrupted run is simply run again.
        """
        if not self.sealer.enabled:
            return 0
        with self._using("listing users"):
            users = self._user_ids()
        count = 0
        for user_id in users:
            with self.writing(user_id, f"re-encrypting the records of user {user_id}") as records:
                images = records.images()
                for row in images:
                    records.put_image(row)
                for case_id in sorted({str(row.load()["case_id"]) for row in records.case_rows()}):
                    for row in records.cases(case_id):
                        records.put_case(row)
                        count += 1
            for row in images:
                image_id = row.record["image_id"]
                with self._using(f"re-encrypting image {image_id}"):
                    path = self._image_file(user_id, image_id)
                    if path is not None:
                        ad = image_binding(user_id, image_id)
                        write_atomic(path, self.sealer.seal(self.sealer.unseal(path.read_bytes(), str(path), ad), ad))
                        count += 1
            count += len(images)
        return count

    # -- reads every back end answers the same way ----------------------------------

    def list_images(self, user_id: str, case_id: str | None = None) -> list[dict[str, Any]]:
        """Image records of a user (optionally of one case), oldest first."""
        with self.reading(check_id("user_id", user_id), "listing images") as records:
            return [row.record for row in records.images(None if case_id is None else str(case_id))]

    def image_record(self, user_id: str, image_id: str) -> dict[str, Any] | None:
        """One image's record as stored now, or None."""
        with self.reading(check_id("user_id", user_id), f"reading image record {image_id}") as records:
            row = records.image(image_id)
        return None if row is None else row.record

    def case_record(self, user_id: str, case_id: str) -> dict[str, Any] | None:
        """The case/uncertain/reject record of that case id as stored now, or None."""
        with self.reading(check_id("user_id", user_id), f"reading case {case_id}") as records:
            rows = records.cases(str(case_id))
        return rows[-1].record if rows else None
