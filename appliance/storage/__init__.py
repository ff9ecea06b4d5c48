"""Durable storage of images, their records, case records and case-id counters.

One `Store` protocol, one module per back end, chosen by `storage.backend` in
the config through `BACKENDS` (imported only when selected). Adding a store is
one module subclassing `base.BaseStore` and one line in `BACKENDS`; the
contract tests (tests/stores.py) then run over it too.

Every method is synchronous and blocking: the app calls them from its single
store-writer thread, never from the event loop. A method that returns has made
its effect durable (fsync'd); one that raises `StoreError` has left nothing
half-done behind. Ids used in paths are checked (`files.check_id`): a bad one
raises ValueError. An open store holds an exclusive lock on its root, so a
second store (or process) opening the same root gets a StoreError until the
first is closed or its process dies. The postgres store is shared by many
instances: it locks only a root holding its image files, and serialises each
user's writes in the database instead.

Shared parts live once: `base` (open, lock, key check, atomic sections),
`files` (durable writes, path checks), `records` (what records contain, case
take-over), `outbox` (the sync jobs). The contract's rules over these
primitives (case ids, upserts, listings) are appliance/cases.py.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..importer import import_from_string

if TYPE_CHECKING:
    from ..buckets.config import BucketConfig
    from .base import Records
    from .config import StorageConfig

BACKENDS: dict[str, str] = {
    "sqlite": "appliance.storage.sqlite:SQLiteStore",
    "disk": "appliance.storage.disk:DiskStore",
    "postgres": "appliance.storage.postgres:PostgresStore",
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
    """What every storage back end offers: primitives the contract's rules (appliance/cases.py) build on.

    Built as `cls(root: Path, *, case_id_start=10000, sealer=None, outbox=False)` plus
    the back end's own options (`cls.configured(storage_config, bucket_config)`); thread-safe.
    `storage.base.BaseStore` implements all but the back end's own I/O.
    """

    name: str
    root: Path
    case_id_start: int

    # The sync outbox (storage/outbox.py): built with `outbox=True`, every image, image
    # record and case record written also becomes a job in the SQLite file at
    # `outbox_path`, never later than its data; the worker reads the data back by name.
    outbox_path: Path
    # Which worker-side outbox drains it (appliance/sync): "sqlite" (the file at outbox_path) or "postgres".
    outbox_kind: str

    def open(self) -> None:
        """Create or migrate the store, and prove it writable; raise StoreError if not."""

    def close(self) -> None:
        """Flush and release everything; safe to call twice."""

    def writing(self, user_id: str, action: str) -> AbstractContextManager[Records]:
        """An atomic section over one user's counter, records and outbox (durable when it ends)."""

    def reading(self, user_id: str | None, action: str) -> AbstractContextManager[Records]:
        """A read-only section over one user's records, or (None) every user's case records."""

    def users(self) -> list[str]:
        """Every user that has records or a counter, sorted."""

    def save_image(self, user_id: str, image: StoredImage, record: dict[str, Any]) -> None:
        """Store the image and its record (and its outbox job) together, durably, or none of them."""

    def read_image(self, user_id: str, image_id: str) -> bytes | None:
        """The stored bytes of an image, or None (sqlite: StoreError if a record has lost its file)."""

    def list_images(self, user_id: str, case_id: str | None = None) -> list[dict[str, Any]]:
        """Image records of a user (optionally of one case), oldest first."""

    def image_record(self, user_id: str, image_id: str) -> dict[str, Any] | None:
        """One image's record as stored now, or None."""

    def case_record(self, user_id: str, case_id: str) -> dict[str, Any] | None:
        """The case/uncertain/reject record of that case id as stored now, or None."""

    def reseal(self) -> int:
        """Rewrite every record and image file of an encrypted store as format v2; how many were rewritten."""

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


def outbox_kind(backend: str) -> str:
    """Which worker-side outbox drains the named back end: "sqlite" (a file) or "postgres" (a table)."""
    return str(import_from_string(BACKENDS[backend]).outbox_kind)


def outbox_location(backend: str, root: Path) -> Path:
    """Where the named back end on `root` keeps its sync outbox, without building or opening a store."""
    return Path(import_from_string(BACKENDS[backend]).outbox_at(root))


def takes_images(backend: str) -> bool:
    """Whether the named back end keeps image bytes apart from its records, so they may live in a bucket."""
    return bool(import_from_string(BACKENDS[backend]).images_apart)


def describe_configured(storage: StorageConfig) -> str:
    """Where the configured store keeps its data, checked as far as can be without opening it (check-config)."""
    return str(import_from_string(BACKENDS[storage.backend]).describe(storage))


def open_configured_store(storage: StorageConfig, *, outbox: bool, bucket: BucketConfig | None = None) -> Store:
    """Open the store `storage` names, with its encryption key, and with its sync outbox when `outbox`.

    The service writes the outbox while sync is on; `appliance sync --once` drains even when it is off.
    `bucket` reaches `storage.images_url` when `storage.images = "bucket"`.
    """
    from ..buckets.config import BucketConfig
    from .crypto import load_sealer

    return open_store(
        storage.backend,
        storage.root,
        case_id_start=storage.case_id_start,
        sealer=load_sealer(storage.encrypt, storage.key_file),
        outbox=outbox,
        # A back end's own keys (postgres: the DSN, timeouts, pool size, the image bucket), read by its module.
        **import_from_string(BACKENDS[storage.backend]).configured(storage, bucket or BucketConfig()),
    )
