"""The PostgreSQL store's schema: numbered migrations, the key check and the outbox's enqueue.

Migrations are append-only and applied by `migrate` inside the caller's
transaction, which holds `MIGRATION_LOCK` (so instances starting together never
race); a schema newer than the code is refused. The key check (what
Sealer.check_root keeps in a file for the file stores) is a row here, shared
by every instance.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigError, StoreError
from .crypto import Sealer, envelope_bytes
from .outbox import KINDS
from .sqlrecords import now_iso

# Taken at open, around migrations and the key check: one constant for every instance.
MIGRATION_LOCK = 0x6170706C6D696772  # "applmigr"

_MIGRATION_1 = """
CREATE TABLE case_counters (user_id text PRIMARY KEY, last_case_id bigint NOT NULL, updated_at text NOT NULL);
CREATE TABLE images (
    seq bigserial PRIMARY KEY, user_id text NOT NULL, image_id text NOT NULL, case_id text, suffix text NOT NULL,
    size_bytes bigint NOT NULL, created_at text, image_key text NOT NULL, record text NOT NULL,
    UNIQUE (user_id, image_id));
CREATE INDEX images_by_case ON images (user_id, case_id, seq);
CREATE TABLE cases (
    seq bigserial PRIMARY KEY, user_id text NOT NULL, case_id text NOT NULL, entry_type text NOT NULL,
    status_key text NOT NULL, created_at text COLLATE "C" NOT NULL, record text NOT NULL);
CREATE INDEX cases_by_case ON cases (user_id, case_id);
CREATE INDEX cases_by_user_time ON cases (user_id, created_at, seq);
CREATE INDEX cases_by_time ON cases (created_at, seq);
CREATE TABLE pending_images (
    user_id text NOT NULL, image_id text NOT NULL, image_key text NOT NULL, created_at text NOT NULL,
    PRIMARY KEY (user_id, image_id));
CREATE TABLE outbox (
    id bigserial PRIMARY KEY, kind text NOT NULL, user_id text NOT NULL, ref text NOT NULL,
    size_bytes bigint NOT NULL DEFAULT 0, created_at double precision NOT NULL, version integer NOT NULL DEFAULT 1,
    attempts integer NOT NULL DEFAULT 0, next_attempt_at double precision NOT NULL DEFAULT 0, last_error text,
    failed_at double precision, dead_at double precision, leased_until double precision,
    UNIQUE (kind, user_id, ref));
CREATE INDEX outbox_due ON outbox (next_attempt_at, id);
CREATE TABLE key_check (id integer PRIMARY KEY CHECK (id = 1), check_value text NOT NULL, created_at text NOT NULL)
"""

# Numbered, append-only: a migration once shipped is never edited.
MIGRATIONS: tuple[tuple[int, str], ...] = ((1, _MIGRATION_1),)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def one_line(error: BaseException) -> str:
    """A driver error as one line (libpq messages span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def check_dsn(dsn: str) -> None:
    """ConfigError when libpq cannot parse the DSN; its own message would quote the DSN, password and all."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ConfigError(
            "the PostgreSQL DSN cannot be parsed (from DATABASE_URL, storage.database_url, "
            "storage.database_url_file or the credential database-url); expected "
            "postgresql://user@host:port/dbname?sslmode=... or key=value pairs"
        ) from None


def describe_dsn(dsn: str) -> str:
    """What messages name: `postgres host:port/dbname`, never the password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgres (unparsable DSN)"
    return f"postgres {parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


def enqueue(conn: psycopg.Connection[Any], kind: str, user_id: str, ref: str, size_bytes: int) -> None:
    """The PostgreSQL twin of storage/outbox.py's `enqueue`, in the caller's transaction."""
    if kind not in KINDS:
        raise ValueError(f"unknown outbox job kind {kind!r}")
    # Every SET expression sees the old row, as in SQLite: a dead letter comes back live with fresh attempts.
    conn.execute(
        "INSERT INTO outbox (kind, user_id, ref, size_bytes, created_at) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (kind, user_id, ref) DO UPDATE SET version = outbox.version + 1,"
        " size_bytes = excluded.size_bytes,"
        " attempts = CASE WHEN outbox.dead_at IS NULL THEN outbox.attempts ELSE 0 END,"
        " next_attempt_at = CASE WHEN outbox.dead_at IS NULL THEN outbox.next_attempt_at ELSE 0 END,"
        " dead_at = NULL",
        (kind, user_id, ref, int(size_bytes), time.time()),
    )


def migrate(conn: psycopg.Connection[Any], label: str) -> None:
    """Apply every migration newer than the database's, in the caller's locked transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at text NOT NULL)")
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    current = int(row[0]) if row else 0
    if current > SCHEMA_VERSION:
        raise StoreError(f"{label}: schema version {current} is newer than this appliance knows ({SCHEMA_VERSION})")
    for version, script in MIGRATIONS:
        if version > current:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)  # constant SQL, not user input
            conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)", (version, now_iso()))


def check_key(conn: psycopg.Connection[Any], sealer: Sealer, label: str) -> None:
    """Sealer.check_key's rules, with the check value in the key_check row, inserted on first use."""
    row = conn.execute("SELECT check_value FROM key_check WHERE id = 1").fetchone()
    where = f"the key_check table of {label}"
    try:
        stored = None if row is None else (where, bytes.fromhex(row[0]))
    except ValueError:
        raise StoreError(f"storage: {where} is unreadable; restore it from a backup") from None
    plain, sealed = _evidence(conn, label)
    new = sealer.check_key(label, stored, plain_data=plain, sealed_sample=sealed)
    if new is not None:
        conn.execute("INSERT INTO key_check (id, check_value, created_at) VALUES (1, %s, %s)", (new.hex(), now_iso()))


def _evidence(conn: psycopg.Connection[Any], label: str) -> tuple[str | None, tuple[str, bytes, bytes | None] | None]:
    """Where plain data was found (or None), and one sealed sample (where, bytes, associated data) or None."""
    row = conn.execute(
        "(SELECT user_id, record FROM images LIMIT 1) UNION ALL (SELECT user_id, record FROM cases LIMIT 1) LIMIT 1"
    ).fetchone()
    sample = None if row is None else envelope_bytes(row[1], row[0])
    plain = f"records in {label}" if row is not None and sample is None else None
    return plain, None if sample is None else (f"a record in {label}", *sample)
