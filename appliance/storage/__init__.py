"""Durable storage of images, their records, case records and case-id counters.

One `Store` protocol, one module per back end, chosen by `storage.backend` in
the config through `BACKENDS` (imported only when selected).

Every method is synchronous and blocking: the app calls them from its single
store-writer thread, never from the event loop. A method that returns has made
its effect durable (fsync'd); one that raises `StoreError` has left nothing
half-done behind. Ids used in paths are checked (`files.check_id`): a bad one
raises ValueError. An open store holds an exclusive lock on its root, so a
second store (or process) opening the same root gets a StoreError until the
first is closed or its process dies.

Shared rules live once: `files` (durable writes, path checks), `records`
(what records contain, case take-over, ordering).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..importer import import_from_string

BACKENDS: dict[str, str] = {
    "sqlite": "appliance.storage.sqlite:SQLiteStore",
    "disk": "appliance.storage.disk:DiskStore",
}

# Record kinds a clinician logs about a case; image records have none.
CASE_ENTRY_TYPES = ("case", "uncertain", "reject")

# Fields of a case record that image records of that case take over when the
# case is logged (the contract's "take over their status and patient fields").
PATIENT_FIELDS = ("gender", "age", "location", "symptoms", "notes")


@dataclass(frozen=True)
class StoredImage:
    """An image to store: its encoded bytes as received and the file suffix."""

    image_id: str
    data: bytes
    suffix: str  # ".jpg", ".png" or ".webp"


class Store(Protocol):
    """What every storage back end offers; records are plain JSON-able dicts.

    Built as `cls(root: Path, *, case_id_start: int = 10000)`; thread-safe.
    """

    def open(self) -> None:
        """Create or migrate the store, and prove it writable; raise StoreError if not."""

    def close(self) -> None:
        """Flush and release everything; safe to call twice."""

    def next_case_id(self, user_id: str) -> str:
        """Allocate the user's next case id ("10000" first); never repeats, even across restarts."""

    def release_case_id(self, user_id: str, case_id: str) -> dict[str, Any]:
        """Give back the most recently issued id when nothing uses it (contract answer body)."""

    def raise_case_counter(self, user_id: str, at_least: int) -> bool:
        """Make the user's last issued case id at least `at_least` (never lower); True if it changed."""

    def save_image(self, user_id: str, image: StoredImage, record: dict[str, Any]) -> None:
        """Store the image and its record together, durably, or neither."""

    def log_case(self, user_id: str, record: dict[str, Any]) -> dict[str, Any]:
        """Upsert a case/uncertain/reject record (by user and case_id); return it as stored."""

    def update_case(self, user_id: str, case_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Update the latest case/uncertain record of that id; None when there is none.

        `case_id`, `entry_type`, `user_id` and `image_ids` in `fields` are ignored;
        the record keeps its place in the listing order. Returns the stored record.
        """

    def list_cases(
        self,
        user_id: str | None,
        *,
        status: str | None,
        limit: int,
        include_uncertain: bool,
        include_rejected: bool,
    ) -> list[dict[str, Any]]:
        """Case records newest first; user_id None means every user's (admin).

        Ordered by `created_at` (ISO strings) descending, ties most recently
        logged first; `status` matches case-insensitively; at most `limit`.
        """

    def list_images(self, user_id: str, case_id: str | None = None) -> list[dict[str, Any]]:
        """Image records of a user (optionally of one case), oldest first."""

    def read_image(self, user_id: str, image_id: str) -> bytes | None:
        """The stored bytes of an image, or None (sqlite: StoreError if a record has lost its file)."""

    # The sync outbox (storage/outbox.py): built with `outbox=True`, every image, image
    # record and case record written also becomes a job in the SQLite file at
    # `outbox_path`, never later than its data; the worker reads the data back by name.
    outbox_path: Path

    def image_record(self, user_id: str, image_id: str) -> dict[str, Any] | None:
        """One image's record as stored now, or None."""

    def case_record(self, user_id: str, case_id: str) -> dict[str, Any] | None:
        """The case/uncertain/reject record of that case id as stored now, or None."""

    def stats(self) -> dict[str, Any]:
        """Counts and sizes for /ready, /v1/info and the status page; cheap to call.

        Always `backend`, `root`, `images`, `cases` (case/uncertain/reject
        records) and `image_bytes`; a back end may add more.
        """


def open_store(backend: str, root: Path, **options: Any) -> Store:
    """Build the named back end on `root` and open it."""
    cls = import_from_string(BACKENDS[backend])
    store: Store = cls(root, **options)
    store.open()
    return store


def outbox_location(backend: str, root: Path) -> Path:
    """Where the named back end on `root` keeps its sync outbox, without building or opening a store."""
    return Path(import_from_string(BACKENDS[backend]).outbox_at(root))


def open_configured_store(config: Any, *, outbox: bool | None = None) -> Store:
    """Open the store `config.storage` names, with its encryption key and, while sync is on, its outbox.

    `outbox` overrides the sync setting (`appliance sync --once` drains even when the service has sync off).
    """
    from .crypto import load_sealer

    storage = config.storage
    return open_store(
        storage.backend,
        storage.root,
        case_id_start=storage.case_id_start,
        sealer=load_sealer(storage.encrypt, storage.key_file),
        outbox=config.sync.enabled if outbox is None else outbox,
    )
