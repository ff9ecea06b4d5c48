"""The worker's side of the sync outbox when it is a PostgreSQL table (storage.backend = "postgres").

Same jobs, versions, retries and dead letters as sync/outbox.py, on the store's
pool. Many instances drain one table: `due()` leases the jobs it returns
(`leased_until`, `FOR UPDATE SKIP LOCKED`), so two instances never upload the
same job at once, and a lease left by an instance that died runs out after
`LEASE_S`. Leases use the database's clock, not the `now` the worker passes (which
is infinity for `sync --once`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from ..errors import StoreUnavailable
from ..storage.config import StorageConfig, resolve_database_url
from ..storage.pgschema import check_dsn
from ..storage.postgres import PostgresStore, describe_dsn, one_line
from .outbox import Backlog, Job

# Longer than any one upload (bucket.timeout_s and its retries): a live worker finishes first.
LEASE_S = 300.0
DB_NOW = "extract(epoch from clock_timestamp())"

_JOB_COLUMNS = "id, kind, user_id, ref, version, attempts, size_bytes"


def read_backlog(conn: psycopg.Connection[Any]) -> Backlog:
    """Count the waiting jobs (one indexed aggregate)."""
    row = conn.execute(
        "SELECT count(*), coalesce(sum(size_bytes), 0), min(created_at), count(failed_at), count(dead_at) FROM outbox"
    ).fetchone()
    last = conn.execute(
        "SELECT last_error, failed_at FROM outbox WHERE failed_at IS NOT NULL ORDER BY failed_at DESC LIMIT 1"
    ).fetchone()
    assert row is not None
    jobs, size, oldest, failing, dead = row
    return Backlog(int(jobs), int(size), oldest, int(failing), last[0] if last else None, last[1] if last else None,
                   int(dead))


def retry_dead_letters(conn: psycopg.Connection[Any]) -> int:
    """Make every dead-lettered job due now with a fresh attempt count; how many (`appliance sync retry`)."""
    with conn.transaction():
        cur = conn.execute(
            "UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = 0, leased_until = NULL"
            " WHERE dead_at IS NOT NULL"
        )
    return int(cur.rowcount)


T = TypeVar("T")


def offline(storage: StorageConfig, use: Callable[[psycopg.Connection[Any]], T]) -> tuple[str, T]:
    """Run `use` on a connection of its own to the configured database (CLI, no store open); (where, result)."""
    dsn = resolve_database_url(storage.database_url, storage.database_url_file)
    check_dsn(dsn)
    where = describe_dsn(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=PostgresStore.connect_timeout_s) as conn:
            return where, use(conn)
    except psycopg.OperationalError as e:
        raise StoreUnavailable(f"sync: database {where} is unavailable: {one_line(e)}") from e


class PgOutbox:
    """The worker's side of an outbox table; the same methods as sync/outbox.py's Outbox; thread-safe."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.path = store.outbox_path

    def close(self) -> None:
        """Nothing of its own to close: the connections are the store's."""

    def due(self, now: float, limit: int, exclude: frozenset[int] = frozenset()) -> list[Job]:
        """Lease and return due jobs, oldest first: none another instance (or this one) holds."""
        with self.store._using("leasing sync jobs"), self.store._connection() as conn, conn.transaction():
            # Leases run on the database's clock: instances whose clocks disagree still never hold one job twice.
            rows = conn.execute(
                f"UPDATE outbox SET leased_until = {DB_NOW} + %s WHERE id IN (SELECT id FROM outbox"
                f" WHERE next_attempt_at <= %s AND dead_at IS NULL AND (leased_until IS NULL OR leased_until <= {DB_NOW})"
                " AND NOT (id = ANY(%s)) ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_JOB_COLUMNS}",
                (LEASE_S, now, list(exclude), limit),
            ).fetchall()
        return sorted((Job(*row) for row in rows), key=lambda job: job.id)

    def next_due_at(self) -> float | None:
        """When the earliest waiting job may be tried again (None: nothing waits)."""
        with self.store._using("reading the sync outbox"), self.store._connection() as conn:
            # A job another instance holds is not due before its lease ends: idle instances do not spin on it.
            row = conn.execute(
                "SELECT min(greatest(next_attempt_at, coalesce(leased_until, 0))) FROM outbox WHERE dead_at IS NULL"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def done(self, job: Job) -> bool:
        """Remove an uploaded job; if it changed meanwhile, keep it due now (lease dropped) and return False."""
        with self.store._using("marking a sync job done"), self.store._connection() as conn, conn.transaction():
            removed = conn.execute("DELETE FROM outbox WHERE id = %s AND version = %s", (job.id, job.version)).rowcount
            if removed != 1:
                conn.execute(
                    "UPDATE outbox SET attempts = 0, next_attempt_at = 0, last_error = NULL, failed_at = NULL,"
                    " dead_at = NULL, leased_until = NULL WHERE id = %s",
                    (job.id,),
                )
        return removed == 1

    def failed(self, job: Job, error: str, now: float, retry_at: float, *, dead: bool = False) -> None:
        """Record a failed attempt and when to try again, or (`dead`) park it; the lease goes."""
        with self.store._using("marking a sync job failed"), self.store._connection() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = %s, last_error = %s, failed_at = %s,"
                " dead_at = CASE WHEN %s AND version = %s THEN %s ELSE NULL END, leased_until = NULL WHERE id = %s",
                (retry_at, error[:1000], now, dead, job.version, now, job.id),
            )

    def backlog(self) -> Backlog:
        """The waiting jobs' numbers."""
        with self.store._using("reading the sync backlog"), self.store._connection() as conn:
            return read_backlog(conn)
