"""The default store: records in one SQLite database, images as plain files beside it.

Layout under the root::

    appliance.db                          WAL mode, synchronous=FULL
    images/<user_id>/<image_id><suffix>   the bytes as stored (metadata stripped, see privacy.py)
    images/<user_id>/<image_id>.bin       instead, with encryption on (storage/crypto.py)
    key_check.json                        with encryption on: proves the key at open

Images are files, not BLOBs: the database stays small for backups and VACUUM,
clinic staff can open images with ordinary tools, and a sync worker can stream
a file without loading it through SQLite.

A file and its record become visible together through a journal: a
`pending_files` row is committed before the file is written and deleted in the
transaction that inserts the image record. A crash in between leaves a pending
row, and `open()` removes its file and temp files. Nothing walks the image tree.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from ..errors import StoreError
from . import StoredImage
from . import records as R
from .base import BaseStore
from .crypto import envelope_bytes, image_binding
from .files import check_id, make_dir, remove_durable, write_atomic
from .outbox import create_table as create_outbox_table
from .outbox import enqueue as enqueue_job
from .sqlrecords import SQLRecords, now_iso

DB_NAME = "appliance.db"
IMAGES_DIR = "images"


def _migration_1(db: Database) -> None:
    """Counters, image records, case records and the pending-files journal.

    Every record table keeps the full record as JSON in `record` (the source of
    truth, unknown keys included) plus the columns it is looked up by. A later
    sync outbox fits as one more table, `outbox(id INTEGER PRIMARY KEY,
    kind TEXT, user_id TEXT, ref TEXT, created_at TEXT, attempts INTEGER)`,
    whose rows `save_image`, `log_case` and `update_case` insert inside the same
    `_transaction()` as the record they announce, naming it by its natural key
    (user_id + image_id, or user_id + case_id), so a job exists iff its record does.
    """
    db.table("case_counters").create(
        {"user_id": str, "last_case_id": int, "updated_at": str},
        pk="user_id",
        not_null={"last_case_id", "updated_at"},
    )
    db.table("images").create(
        {
            "seq": int,  # write order: list_images returns oldest first by it
            "user_id": str,
            "image_id": str,
            "case_id": str,
            "suffix": str,
            "size_bytes": int,
            "created_at": str,
            "record": str,
        },
        pk="seq",
        not_null={"user_id", "image_id", "suffix", "size_bytes", "record"},
    )
    db.table("images").create_index(["user_id", "image_id"], unique=True)
    db.table("images").create_index(["user_id", "case_id", "seq"])
    db.table("cases").create(
        {
            "seq": int,  # write order: breaks created_at ties, newest first
            "user_id": str,
            "case_id": str,
            "entry_type": str,
            "status_key": str,  # casefolded status, for case-insensitive filtering
            "created_at": str,
            "record": str,
        },
        pk="seq",
        not_null={"user_id", "case_id", "entry_type", "status_key", "created_at", "record"},
    )
    db.table("cases").create_index(["user_id", "case_id"])
    db.table("cases").create_index(["user_id", "created_at", "seq"])
    db.table("cases").create_index(["created_at", "seq"])
    db.table("pending_files").create(
        {"user_id": str, "image_id": str, "suffix": str, "created_at": str},
        pk=("user_id", "image_id"),
        not_null={"suffix", "created_at"},
    )


def _migration_2(db: Database) -> None:
    """The sync outbox (storage/outbox.py), whose jobs commit in their record's transaction."""
    create_outbox_table(db.conn)


# Numbered, append-only: a migration once shipped is never edited.
MIGRATIONS: tuple[tuple[int, Callable[[Database], None]], ...] = ((1, _migration_1), (2, _migration_2))
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SQLiteStore(BaseStore):
    """Records in `root/appliance.db`, images under `root/images/`; see the module docstring."""

    name = "sqlite"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.db_path = self.root / DB_NAME
        self.images_dir = self.root / IMAGES_DIR
        # One connection shared by every caller thread, used only under the base's lock.
        self._conn: sqlite3.Connection | None = None
        self._db: Database | None = None

    @staticmethod
    def outbox_at(root: Path) -> Path:
        """Where a store on `root` keeps its outbox: in its own database, so jobs commit with records."""
        return Path(root) / DB_NAME

    @property
    def _label(self) -> str:
        return str(self.db_path)

    # -- lifetime -----------------------------------------------------------

    def _open_root(self) -> None:
        """Create or migrate the database, check the key, sweep a crashed save's leftovers."""
        make_dir(self.images_dir)
        # isolation_level=None: transactions are opened explicitly with BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._conn = conn
        self._db = Database(conn, execute_plugins=False)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{self.db_path}: cannot use WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        self._check_key()
        self._sweep_pending()

    def _close_root(self) -> None:
        """Close the database (checkpointing the WAL)."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = self._db = None

    def _migrate(self) -> None:
        assert self._conn is not None and self._db is not None
        self._db.table("schema_migrations").create(
            {"version": int, "applied_at": str}, pk="version", not_null={"applied_at"}, if_not_exists=True
        )
        current = self._conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.db_path}: schema version {current} is newer than this appliance knows ({SCHEMA_VERSION})"
            )
        for version, migrate in MIGRATIONS:
            if version > current:
                with self._transaction():
                    migrate(self._db)
                    self._db.table("schema_migrations").insert({"version": version, "applied_at": now_iso()})

    def _key_evidence(self) -> tuple[str | None, tuple[str, bytes, bytes | None] | None]:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT user_id, record FROM images UNION ALL SELECT user_id, record FROM cases LIMIT 1"
        ).fetchone()
        sample = None if row is None else envelope_bytes(row[1], row[0])
        plain = f"records in {self.db_path}" if row is not None and sample is None else None
        return plain, None if sample is None else (f"a record in {self.db_path}", *sample)

    def _load(self, body: str, user_id: str) -> dict[str, Any]:
        """A record of `user_id`'s from its `record` column (decrypted when encrypted)."""
        return self.sealer.loads(body, f"a record in {self.db_path}", user_id)

    def _sweep_pending(self) -> None:
        """Remove the files of saves that never committed their record (a crash mid-save)."""
        assert self._conn is not None
        rows = self._conn.execute("SELECT user_id, image_id, suffix FROM pending_files").fetchall()
        for user_id, image_id, suffix in rows:
            self._discard_pending(user_id, image_id, suffix)

    def _discard_pending(self, user_id: str, image_id: str, suffix: str) -> None:
        """Remove a pending save's file and temp files, then its journal row."""
        assert self._conn is not None
        path = self._image_path(user_id, image_id, suffix)
        committed = self._conn.execute(
            "SELECT 1 FROM images WHERE user_id = ? AND image_id = ?", (user_id, image_id)
        ).fetchone()
        if path.parent.is_dir():
            # A record that did commit (its COMMIT reported an error but reached the
            # disk) keeps its file: only the temp files go.
            stray = list(path.parent.glob(f".{path.name}.*.tmp"))
            remove_durable(stray if committed else [path, *stray])
        with self._transaction():
            self._conn.execute(
                "DELETE FROM pending_files WHERE user_id = ? AND image_id = ?", (user_id, image_id)
            )

    # -- plumbing -----------------------------------------------------------

    @contextlib.contextmanager
    def _section(self, user_id: str | None, write: bool) -> Iterator[SQLRecords]:
        assert self._conn is not None
        if not write:
            yield SQLRecords(self, self._conn, user_id, enqueue_job)
            return
        with self._transaction() as conn:
            yield SQLRecords(self, conn, user_id, enqueue_job)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; durable (synchronous=FULL) once the block exits."""
        conn = self._conn
        assert conn is not None
        # IMMEDIATE takes the write lock up front, so a read-then-write never
        # fails half-way with SQLITE_BUSY.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _user_ids(self) -> list[str]:
        assert self._conn is not None
        sql = "SELECT user_id FROM images UNION SELECT user_id FROM cases UNION SELECT user_id FROM case_counters"
        return [row[0] for row in self._conn.execute(sql).fetchall()]

    def _image_file(self, user_id: str, image_id: str) -> Path | None:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT suffix FROM images WHERE user_id = ? AND image_id = ?", (user_id, image_id)
        ).fetchone()
        return None if row is None else self._image_path(user_id, image_id, row[0])

    def _image_path(self, user_id: str, image_id: str, suffix: str) -> Path:
        # Encrypted files are named .bin: their bytes are no longer a .jpg, .png or .webp.
        return self.images_dir / user_id / f"{image_id}{'.bin' if self.sealer.enabled else suffix}"

    # -- images -------------------------------------------------------------

    def save_image(self, user_id: str, image: StoredImage, record: dict[str, Any]) -> None:
        """Store the file and its record durably, or neither (see the module docstring)."""
        check_id("user_id", user_id)
        rec = R.image_record(image, record)
        body = self.sealer.dumps(rec, user_id)
        path = self._image_path(user_id, image.image_id, image.suffix)
        with self._using(f"saving image {image.image_id}"):
            conn = self._conn
            assert conn is not None
            if conn.execute(
                "SELECT 1 FROM images WHERE user_id = ? AND image_id = ?", (user_id, image.image_id)
            ).fetchone():
                raise StoreError(f"image {image.image_id} of user {user_id} is already stored")
            with self._transaction():
                conn.execute(
                    "INSERT INTO pending_files (user_id, image_id, suffix, created_at) VALUES (?, ?, ?, ?)",
                    (user_id, image.image_id, image.suffix, now_iso()),
                )
            try:
                make_dir(path.parent)
                self._write_image_file(path, bytes(image.data), image_binding(user_id, image.image_id))
                self._commit_image_record(user_id, image, rec, body)
            except BaseException:
                # Best effort; whatever is left is swept at the next open().
                with contextlib.suppress(OSError, sqlite3.Error):
                    self._discard_pending(user_id, image.image_id, image.suffix)
                raise

    def _write_image_file(self, path: Path, data: bytes, ad: bytes) -> None:
        write_atomic(path, self.sealer.seal(data, ad))

    def _commit_image_record(self, user_id: str, image: StoredImage, rec: dict[str, Any], body: str) -> None:
        """The commit point of a save: the record appears and the journal row goes, together."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO images (user_id, image_id, case_id, suffix, size_bytes, created_at, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (user_id, image.image_id, rec.get("case_id"), image.suffix, len(image.data),
                 R.created_key(rec), body),
            )
            conn.execute(
                "DELETE FROM pending_files WHERE user_id = ? AND image_id = ?", (user_id, image.image_id)
            )
            if self.outbox_enabled:
                enqueue_job(conn, "image", user_id, image.image_id, len(image.data) + len(body))

    def read_image(self, user_id: str, image_id: str) -> bytes | None:
        """The stored bytes of an image, or None if there is no such image record."""
        check_id("user_id", user_id)
        check_id("image_id", image_id)
        with self._using(f"reading image {image_id}"):
            assert self._conn is not None
            row = self._conn.execute(
                "SELECT suffix FROM images WHERE user_id = ? AND image_id = ?", (user_id, image_id)
            ).fetchone()
            if row is None:
                return None
            # A record without its file is damage, not absence: say so.
            path = self._image_path(user_id, image_id, row[0])
            return self.sealer.unseal(path.read_bytes(), str(path), image_binding(user_id, image_id))

    # -- status -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Backend, root, record counts and image bytes, from indexed queries (no directory walk)."""
        with self._using("reading store stats"):
            conn = self._conn
            assert conn is not None
            images, image_bytes = conn.execute("SELECT count(*), coalesce(sum(size_bytes), 0) FROM images").fetchone()
            cases = conn.execute("SELECT count(*) FROM cases").fetchone()[0]
            users = conn.execute("SELECT count(*) FROM case_counters").fetchone()[0]
            pending = conn.execute("SELECT count(*) FROM pending_files").fetchone()[0]
        db_bytes = sum(
            p.stat().st_size for p in (self.db_path, self.db_path.with_name(DB_NAME + "-wal")) if p.exists()
        )
        return {
            "backend": self.name,
            "root": str(self.root),
            "images": images,
            "cases": cases,
            "image_bytes": image_bytes,
            "users_with_counters": users,
            "pending_files": pending,
            "db_bytes": db_bytes,
            "schema_version": SCHEMA_VERSION,
        }
