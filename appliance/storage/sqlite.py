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
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlite_utils import Database

from ..errors import StoreError
from . import StoredImage
from . import records as R
from .crypto import Sealer, envelope_bytes
from .outbox import create_table as create_outbox_table
from .outbox import enqueue as enqueue_job
from .files import check_id, lock_root, make_dir, prepare_root, remove_durable, write_atomic

DB_NAME = "appliance.db"
IMAGES_DIR = "images"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


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


class SQLiteStore:
    """Records in `root/appliance.db`, images under `root/images/`; see the module docstring."""

    name = "sqlite"

    def __init__(
        self, root: Path, *, case_id_start: int = 10000, sealer: Sealer | None = None, outbox: bool = False
    ) -> None:
        self.root = Path(root)
        # Sync on: every record write also commits its outbox job (storage/outbox.py), in this database.
        self.outbox_enabled = bool(outbox)
        self.case_id_start = int(case_id_start)
        # Encryption at rest: image files and the `record` column (storage/crypto.py).
        self.sealer = sealer or Sealer(None)
        self.db_path = self.root / DB_NAME
        self.outbox_path = self.outbox_at(self.root)
        self.images_dir = self.root / IMAGES_DIR
        # One connection shared by every caller thread, so every use holds this lock.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._db: Database | None = None
        self._lock_file: IO[bytes] | None = None

    @staticmethod
    def outbox_at(root: Path) -> Path:
        """Where a store on `root` keeps its outbox: in its own database, so jobs commit with records."""
        return Path(root) / DB_NAME

    # -- lifetime -----------------------------------------------------------

    def open(self) -> None:
        """Create or migrate the database, sweep a crashed save's leftovers, prove the root writable."""
        with self._lock:
            if self._conn is not None:
                return
            prepare_root(self.root)
            self._lock_file = lock_root(self.root)
            try:
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
            except (OSError, sqlite3.Error) as e:
                self._release()
                raise StoreError(f"cannot open store {self.db_path}: {e}") from e
            except BaseException:
                self._release()
                raise

    def close(self) -> None:
        """Close the database (checkpointing the WAL) and release the root's lock; safe twice."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = self._db = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

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
                    self._db.table("schema_migrations").insert({"version": version, "applied_at": _now()})

    def _check_key(self) -> None:
        """Refuse a wrong key, or plain and encrypted records mixed (storage/crypto.py)."""
        assert self._conn is not None
        row = self._conn.execute("SELECT record FROM images UNION ALL SELECT record FROM cases LIMIT 1").fetchone()
        blob = None if row is None else envelope_bytes(row[0])
        self.sealer.check_root(
            self.root,
            plain_data=f"records in {self.db_path}" if row is not None and blob is None else None,
            sealed_sample=None if blob is None else (f"a record in {self.db_path}", blob),
        )

    def _load(self, body: str) -> dict[str, Any]:
        """A record from its `record` column (decrypted when encrypted)."""
        return self.sealer.loads(body, f"a record in {self.db_path}")

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
    def _using(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and the open connection; turn I/O and SQLite failures into StoreError."""
        with self._lock:
            if self._conn is None:
                raise StoreError(f"store {self.root} is not open")
            try:
                yield self._conn
            except (OSError, sqlite3.Error) as e:
                raise StoreError(f"{action} failed in {self.root}: {e}") from e

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

    def _image_path(self, user_id: str, image_id: str, suffix: str) -> Path:
        # Encrypted files are named .bin: their bytes are no longer a .jpg, .png or .webp.
        return self.images_dir / user_id / f"{image_id}{'.bin' if self.sealer.enabled else suffix}"

    # -- case ids -----------------------------------------------------------

    def next_case_id(self, user_id: str) -> str:
        """Allocate the user's next case id ("10000" first); durable before it returns."""
        check_id("user_id", user_id)
        with self._using("allocating a case id"), self._transaction() as conn:
            row = conn.execute("SELECT last_case_id FROM case_counters WHERE user_id = ?", (user_id,)).fetchone()
            # max(): a raised case_id_start takes effect; a lowered one never reissues ids.
            issued = self.case_id_start if row is None else max(row[0] + 1, self.case_id_start)
            self._set_counter(conn, user_id, issued)
        return str(issued)

    def release_case_id(self, user_id: str, case_id: str) -> dict[str, Any]:
        """Give back the most recently issued id when no record uses it (the contract's answer)."""
        check_id("user_id", user_id)
        with self._using("releasing a case id"), self._transaction() as conn:
            row = conn.execute("SELECT last_case_id FROM case_counters WHERE user_id = ?", (user_id,)).fetchone()
            if row is None:
                return {"status": "skipped", "reason": "missing_counter"}
            last = row[0]
            if int(case_id) != last:
                return {"status": "skipped", "reason": "counter_mismatch", "last_case_id": str(last)}
            forms = R.case_id_forms(case_id)
            marks = ",".join("?" * len(forms))
            in_use = conn.execute(
                f"SELECT 1 FROM images WHERE user_id = ? AND case_id IN ({marks})"
                f" UNION ALL SELECT 1 FROM cases WHERE user_id = ? AND case_id IN ({marks}) LIMIT 1",
                (user_id, *forms, user_id, *forms),
            ).fetchone()
            if in_use:
                return {"status": "skipped", "reason": "case_in_use"}
            self._set_counter(conn, user_id, last - 1)
        return {"status": "ok", "case_id": case_id}

    def _set_counter(self, conn: sqlite3.Connection, user_id: str, last: int) -> None:
        conn.execute(
            "INSERT INTO case_counters (user_id, last_case_id, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET last_case_id = excluded.last_case_id,"
            " updated_at = excluded.updated_at",
            (user_id, last, _now()),
        )

    def raise_case_counter(self, user_id: str, at_least: int) -> bool:
        """Make the user's last issued case id at least `at_least` (never lower); True if it changed."""
        check_id("user_id", user_id)
        with self._using("raising a case counter"), self._transaction() as conn:
            row = conn.execute("SELECT last_case_id FROM case_counters WHERE user_id = ?", (user_id,)).fetchone()
            if row is not None and row[0] >= at_least:
                return False
            self._set_counter(conn, user_id, int(at_least))
        return True

    # -- images -------------------------------------------------------------

    def save_image(self, user_id: str, image: StoredImage, record: dict[str, Any]) -> None:
        """Store the file and its record durably, or neither (see the module docstring)."""
        check_id("user_id", user_id)
        rec = R.image_record(image, record)
        body = self.sealer.dumps(rec)
        path = self._image_path(user_id, image.image_id, image.suffix)
        with self._using(f"saving image {image.image_id}") as conn:
            if conn.execute(
                "SELECT 1 FROM images WHERE user_id = ? AND image_id = ?", (user_id, image.image_id)
            ).fetchone():
                raise StoreError(f"image {image.image_id} of user {user_id} is already stored")
            with self._transaction():
                conn.execute(
                    "INSERT INTO pending_files (user_id, image_id, suffix, created_at) VALUES (?, ?, ?, ?)",
                    (user_id, image.image_id, image.suffix, _now()),
                )
            try:
                make_dir(path.parent)
                self._write_image_file(path, bytes(image.data))
                self._commit_image_record(user_id, image, rec, body)
            except BaseException:
                # Best effort; whatever is left is swept at the next open().
                with contextlib.suppress(OSError, sqlite3.Error):
                    self._discard_pending(user_id, image.image_id, image.suffix)
                raise

    def _write_image_file(self, path: Path, data: bytes) -> None:
        write_atomic(path, self.sealer.seal(data))

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

    def list_images(self, user_id: str, case_id: str | None = None) -> list[dict[str, Any]]:
        """Image records of a user (optionally of one case), oldest first."""
        check_id("user_id", user_id)
        sql, params = "SELECT record FROM images WHERE user_id = ?", [user_id]
        if case_id is not None:
            sql += " AND case_id = ?"
            params.append(str(case_id))
        with self._using("listing images") as conn:
            rows = conn.execute(sql + " ORDER BY seq", params).fetchall()
        return [self._load(body) for (body,) in rows]

    def read_image(self, user_id: str, image_id: str) -> bytes | None:
        """The stored bytes of an image, or None if there is no such image record."""
        check_id("user_id", user_id)
        check_id("image_id", image_id)
        with self._using(f"reading image {image_id}") as conn:
            row = conn.execute(
                "SELECT suffix FROM images WHERE user_id = ? AND image_id = ?", (user_id, image_id)
            ).fetchone()
            if row is None:
                return None
            # A record without its file is damage, not absence: say so.
            path = self._image_path(user_id, image_id, row[0])
            return self.sealer.unseal(path.read_bytes(), str(path))

    # -- case records -------------------------------------------------------

    def log_case(self, user_id: str, record: dict[str, Any]) -> dict[str, Any]:
        """Upsert a case/uncertain/reject record by (user, case_id); image records take it over."""
        check_id("user_id", user_id)
        rec = R.case_record(record)
        with self._using(f"logging case {rec['case_id']}"), self._transaction() as conn:
            conn.execute("DELETE FROM cases WHERE user_id = ? AND case_id = ?", (user_id, rec["case_id"]))
            rec["image_ids"] = self._image_ids(conn, user_id, rec["case_id"])
            conn.execute(
                "INSERT INTO cases (user_id, case_id, entry_type, status_key, created_at, record)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (user_id, rec["case_id"], rec["entry_type"], R.status_key(rec.get("status")),
                 R.created_key(rec), self.sealer.dumps(rec)),
            )
            self._take_over(conn, user_id, rec)
            self._enqueue_case(conn, user_id, rec)
        return rec

    def update_case(self, user_id: str, case_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Merge `fields` into the latest case/uncertain record of that id; None when there is none."""
        check_id("user_id", user_id)
        case_id = str(case_id)
        with self._using(f"updating case {case_id}"), self._transaction() as conn:
            marks = ",".join("?" * len(R.UPDATABLE_ENTRY_TYPES))
            row = conn.execute(
                f"SELECT seq, record FROM cases WHERE user_id = ? AND case_id = ? AND entry_type IN ({marks})"
                " ORDER BY seq DESC LIMIT 1",
                (user_id, case_id, *R.UPDATABLE_ENTRY_TYPES),
            ).fetchone()
            if row is None:
                return None
            rec = R.merge_update(self._load(row[1]), fields)
            rec["image_ids"] = self._image_ids(conn, user_id, case_id)
            # Updated in place: the record keeps its place (seq) in the listing order.
            conn.execute(
                "UPDATE cases SET status_key = ?, created_at = ?, record = ? WHERE seq = ?",
                (R.status_key(rec.get("status")), R.created_key(rec), self.sealer.dumps(rec), row[0]),
            )
            self._take_over(conn, user_id, rec)
            self._enqueue_case(conn, user_id, rec)
        return rec

    def _enqueue_case(self, conn: sqlite3.Connection, user_id: str, rec: dict[str, Any]) -> None:
        """Outbox jobs for a case record and the image records its take-over changed."""
        if self.outbox_enabled:
            enqueue_job(conn, "case", user_id, rec["case_id"], len(R.dumps(rec)))
            for image_id in rec["image_ids"]:
                enqueue_job(conn, "image_record", user_id, image_id)

    def image_record(self, user_id: str, image_id: str) -> dict[str, Any] | None:
        """One image's record as stored now, or None."""
        check_id("user_id", user_id)
        with self._using(f"reading image record {image_id}") as conn:
            row = conn.execute(
                "SELECT record FROM images WHERE user_id = ? AND image_id = ?", (user_id, image_id)
            ).fetchone()
        return None if row is None else self._load(row[0])

    def case_record(self, user_id: str, case_id: str) -> dict[str, Any] | None:
        """The case/uncertain/reject record of that case id as stored now, or None."""
        check_id("user_id", user_id)
        with self._using(f"reading case {case_id}") as conn:
            row = conn.execute(
                "SELECT record FROM cases WHERE user_id = ? AND case_id = ? ORDER BY seq DESC LIMIT 1",
                (user_id, str(case_id)),
            ).fetchone()
        return None if row is None else self._load(row[0])

    def _image_ids(self, conn: sqlite3.Connection, user_id: str, case_id: str) -> list[str]:
        rows = conn.execute(
            "SELECT image_id FROM images WHERE user_id = ? AND case_id = ? ORDER BY seq", (user_id, case_id)
        ).fetchall()
        return [image_id for (image_id,) in rows]

    def _take_over(self, conn: sqlite3.Connection, user_id: str, case: dict[str, Any]) -> None:
        """Copy the case's status and non-empty patient fields into its image records."""
        fields = R.takeover(case)
        rows = conn.execute(
            "SELECT seq, record FROM images WHERE user_id = ? AND case_id = ?", (user_id, case["case_id"])
        ).fetchall()
        for seq, body in rows:
            image_rec = self._load(body)
            image_rec.update(fields)
            conn.execute("UPDATE images SET record = ? WHERE seq = ?", (self.sealer.dumps(image_rec), seq))

    def list_cases(
        self,
        user_id: str | None,
        *,
        status: str | None,
        limit: int,
        include_uncertain: bool,
        include_rejected: bool,
    ) -> list[dict[str, Any]]:
        """Case records newest first (created_at, then latest written); user_id None: every user's."""
        types = R.listed_entry_types(include_uncertain, include_rejected)
        sql = f"SELECT record FROM cases WHERE entry_type IN ({','.join('?' * len(types))})"
        params: list[Any] = list(types)
        if user_id is not None:
            check_id("user_id", user_id)
            sql += " AND user_id = ?"
            params.append(user_id)
        if status is not None:
            sql += " AND status_key = ?"
            params.append(R.status_key(status))
        sql += " ORDER BY created_at DESC, seq DESC LIMIT ?"
        params.append(max(int(limit), 0))
        with self._using("listing cases") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [self._load(body) for (body,) in rows]

    # -- status -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Backend, root, record counts and image bytes, from indexed queries (no directory walk)."""
        with self._using("reading store stats") as conn:
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

