"""The worker's side of the sync outbox: claim due jobs, mark them done or failed, count the backlog.

The table, its connection settings and `enqueue` belong to storage
(storage/outbox.py), which writes every job; this module only drains. A job names what to upload, never the bytes: (`kind`, `user_id`, `ref`) is an
image ("image": bytes and record), an image record changed by a case
("image_record") or a case record ("case"). The worker reads the current
bytes and record through the Store at upload time, so one job per name is
enough: enqueueing a name that is already waiting bumps its `version`
instead of adding a row, and `done()` deletes a job only if its version is
the one that was uploaded (a change made during the upload uploads again).
After `sync.max_attempts` failures a job becomes a dead letter (`dead_at`):
kept, counted and shown, skipped by `due()` until `appliance sync retry`.

The sqlite store keeps this table in its own database and inserts jobs in the
record's transaction; the disk store keeps it in `outbox.db` beside the user
folders and commits the job before the data it announces (a job whose data
never landed finds no record and is dropped as `gone`). The worker updates
job state through its own connection (WAL lets it run beside the store's
writer; `busy_timeout` serialises the two writers).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..storage.outbox import connect, create_table, has_dead_letters


@dataclass(frozen=True)
class Job:
    """One waiting upload, as claimed by the worker."""

    id: int
    kind: str
    user_id: str
    ref: str
    version: int
    attempts: int
    size_bytes: int


@dataclass(frozen=True)
class Backlog:
    """What is waiting: the numbers `sync status`, /ready and /v1/info show."""

    jobs: int = 0
    bytes_pending: int = 0
    oldest_pending_at: float | None = None
    failing_jobs: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    dead_letters: int = 0  # jobs given up after sync.max_attempts; counted in `jobs` too

    def as_dict(self) -> dict[str, Any]:
        return {
            "backlog": self.jobs,
            "bytes_pending": self.bytes_pending,
            "oldest_pending": iso_time(self.oldest_pending_at),
            "failing_jobs": self.failing_jobs,
            "dead_letters": self.dead_letters,
            "last_error": self.last_error,
            "last_error_at": iso_time(self.last_error_at),
        }


def iso_time(ts: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def read_backlog(conn: sqlite3.Connection) -> Backlog:
    """Count the waiting jobs (indexed aggregate; cheap enough for every status call)."""
    dead = "count(dead_at)" if has_dead_letters(conn) else "0"
    jobs, size, oldest, failing, dead_letters = conn.execute(
        f"SELECT count(*), coalesce(sum(size_bytes), 0), min(created_at), count(failed_at), {dead} FROM outbox"
    ).fetchone()
    row = conn.execute(
        "SELECT last_error, failed_at FROM outbox WHERE failed_at IS NOT NULL ORDER BY failed_at DESC LIMIT 1"
    ).fetchone()
    return Backlog(jobs, size, oldest, failing, row[0] if row else None, row[1] if row else None, dead_letters)


def retry_dead_letters(path: Path) -> int:
    """Make every dead-lettered job due now with a fresh attempt count; how many (`appliance sync retry`).

    Safe beside a running server: WAL and busy_timeout serialise it with the worker.
    """
    if not path.exists():
        return 0
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        create_table(conn)
        count = conn.execute(
            "UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = 0 WHERE dead_at IS NOT NULL"
        ).rowcount
        conn.execute("COMMIT")
        return int(count)
    finally:
        conn.close()


def read_backlog_at(path: Path) -> Backlog:
    """The backlog of an outbox database on disk, read-only (works while the server runs)."""
    if not path.exists():
        return Backlog()
    conn = connect(path, readonly=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'").fetchone() is None:
            return Backlog()
        return read_backlog(conn)
    finally:
        conn.close()


class Outbox:
    """The worker's side of the outbox: claim due jobs, mark them done or failed; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = connect(self.path)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            create_table(self._conn)
            self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection; safe twice."""
        with self._lock:
            self._conn.close()

    def due(self, now: float, limit: int, exclude: frozenset[int] = frozenset()) -> list[Job]:
        """Jobs whose retry time has come, oldest first, skipping those already in flight."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, kind, user_id, ref, version, attempts, size_bytes FROM outbox"
                " WHERE next_attempt_at <= ? AND dead_at IS NULL ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
        return [Job(*row) for row in rows if row[0] not in exclude][:limit]

    def next_due_at(self) -> float | None:
        """When the earliest waiting job may be tried again (None: nothing waits)."""
        with self._lock:
            return self._conn.execute("SELECT min(next_attempt_at) FROM outbox WHERE dead_at IS NULL").fetchone()[0]

    def done(self, job: Job) -> bool:
        """Remove an uploaded job; if it changed meanwhile, keep it due now and return False."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute("DELETE FROM outbox WHERE id = ? AND version = ?", (job.id, job.version))
                removed = cur.rowcount == 1
                if not removed:
                    self._conn.execute(
                        "UPDATE outbox SET attempts = 0, next_attempt_at = 0, last_error = NULL, failed_at = NULL,"
                        " dead_at = NULL WHERE id = ?",
                        (job.id,),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return removed

    def failed(self, job: Job, error: str, now: float, retry_at: float, *, dead: bool = False) -> None:
        """Record a failed attempt and when to try again, or (`dead`) park it as a dead letter; never dropped.

        A job changed during the attempt (its version moved on) is not parked: the change may fix it.
        """
        with self._lock:
            self._conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, failed_at = ?,"
                " dead_at = CASE WHEN ? AND version = ? THEN ? ELSE NULL END WHERE id = ?",
                (retry_at, error[:1000], now, dead, job.version, now, job.id),
            )

    def backlog(self) -> Backlog:
        """The waiting jobs' numbers."""
        with self._lock:
            return read_backlog(self._conn)
