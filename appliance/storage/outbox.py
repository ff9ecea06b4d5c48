"""The sync outbox's table, owned by storage: every store writes its jobs here, the sync worker drains them.

A job names what to upload, never the bytes: (`kind`, `user_id`, `ref`) is an
image ("image": bytes and record), an image record changed by a case
("image_record") or a case record ("case"); `size_bytes` is what it will
upload, for the sync disk budget. A job that failed `sync.max_attempts` times
has `dead_at` set: a dead letter, kept but no longer tried until
`appliance sync retry`. Enqueueing a name that is already
waiting bumps its `version` instead of adding a row (see sync/outbox.py for
how the worker uses it).

The sqlite store keeps this table in its own database and inserts jobs in the
record's transaction; the disk store keeps it in `outbox.db` beside the user
folders and commits the job before the data it announces (a job whose data
never landed finds no record and is dropped as `gone`).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from ..errors import StoreError

KINDS = ("image", "image_record", "case")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL,
    ref TEXT NOT NULL,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    failed_at REAL,
    dead_at REAL,
    UNIQUE (kind, user_id, ref)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, id);
"""


def create_table(conn: sqlite3.Connection) -> None:
    """Create the outbox table and its index if missing, and add `dead_at` to an older table (inside the caller's transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    # Outboxes written before dead letters (issue 13) lack the column; their jobs stay live.
    if not has_dead_letters(conn):
        conn.execute("ALTER TABLE outbox ADD COLUMN dead_at REAL")


def has_dead_letters(conn: sqlite3.Connection) -> bool:
    """True when the outbox table has the `dead_at` column (a read-only reader of an old file may find none)."""
    return any(row[1] == "dead_at" for row in conn.execute("PRAGMA table_info(outbox)"))


def enqueue(conn: sqlite3.Connection, kind: str, user_id: str, ref: str, size_bytes: int) -> None:
    """Announce that (kind, user, ref) must be uploaded, `size_bytes` counting against the sync budget.

    Within the caller's transaction. A new version of a dead-lettered job is live again:
    what it names changed, so the next upload may well succeed.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown outbox job kind {kind!r}")
    conn.execute(
        "INSERT INTO outbox (kind, user_id, ref, size_bytes, created_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (kind, user_id, ref) DO UPDATE SET version = version + 1, size_bytes = excluded.size_bytes,"
        # SQLite evaluates every SET expression on the old row, so each CASE still sees dead_at.
        " attempts = CASE WHEN dead_at IS NULL THEN attempts ELSE 0 END,"
        " next_attempt_at = CASE WHEN dead_at IS NULL THEN next_attempt_at ELSE 0 END, dead_at = NULL",
        (kind, user_id, ref, int(size_bytes), time.time()),
    )


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode with synchronous=FULL (a job committed is a job kept)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            conn.close()
            raise sqlite3.OperationalError(f"{path}: cannot use WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


# (kind, user_id, ref, size_bytes): one job as a store announces it.
JobSpec = tuple[str, str, str, int]


def open_outbox(path: Path) -> sqlite3.Connection:
    """Connect to an outbox database of its own (the disk store's) and create its table; StoreError if not."""
    try:
        conn = connect(path)
        try:
            commit_jobs(conn, path, [], create=True)
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the sync outbox {path}: {e}") from e
    return conn


def commit_jobs(conn: sqlite3.Connection, path: Path, jobs: list[JobSpec], *, create: bool = False) -> None:
    """Enqueue `jobs` in one transaction of their own (a store whose outbox is a separate database)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if create:
                create_table(conn)
            for job in jobs:
                enqueue(conn, *job)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise StoreError(f"writing the sync outbox {path} failed: {e}") from e
