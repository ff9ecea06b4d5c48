"""The `Records` view both SQL back ends share: the same tables and statements, their own placeholder.

sqlite.py and postgres.py lay out `case_counters`, `images` and `cases` alike
(the full record as JSON text in `record`, sealed and bound to its user when
encryption is on, plus the columns it is looked up by). Statements are written
with `?` and turned into the driver's placeholder (`%s` for psycopg).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any, Protocol

from . import records as R
from .base import EVERY_CASE, CaseQuery, CaseRow, Row
from .crypto import Sealer


class _Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What both drivers' connections offer here: `execute(sql, params)` returning a cursor."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...


class SQLStore(Protocol):
    """What the view needs of its store."""

    sealer: Sealer
    outbox_enabled: bool

    def _load(self, body: str, user_id: str) -> dict[str, Any]: ...


def now_iso() -> str:
    """The current UTC time as ISO 8601 (counters' `updated_at`, journal rows)."""
    return datetime.now(timezone.utc).isoformat()


class SQLRecords:
    """One user's rows (or every user's case rows) inside a section's transaction; see base.Records."""

    mark = "?"  # the driver's placeholder

    def __init__(self, store: SQLStore, conn: Connection, user_id: str | None,
                 enqueue: Callable[[Any, str, str, str, int], None]) -> None:
        self.store, self.conn, self.user_id = store, conn, user_id
        self._enqueue = enqueue  # the back end's outbox insert, in this transaction

    def _run(self, sql: str, *params: Any) -> Any:
        return self.conn.execute(sql if self.mark == "?" else sql.replace("?", self.mark), params)

    def _dumps(self, record: dict[str, Any]) -> str:
        assert self.user_id is not None
        return self.store.sealer.dumps(record, self.user_id)

    def _rows(self, sql: str, *params: Any) -> list[Row]:
        # Every caller selects one user's rows (WHERE user_id = ?), and the body is bound to that user.
        assert self.user_id is not None
        return [Row(seq, self.store._load(body, self.user_id)) for seq, body in self._run(sql, *params).fetchall()]

    def counter(self) -> int | None:
        row = self._run("SELECT last_case_id FROM case_counters WHERE user_id = ?", self.user_id).fetchone()
        return None if row is None else int(row[0])

    def set_counter(self, last: int) -> None:
        self._run(
            "INSERT INTO case_counters (user_id, last_case_id, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET last_case_id = excluded.last_case_id,"
            " updated_at = excluded.updated_at",
            self.user_id, last, now_iso(),
        )

    def images(self, case_id: str | None = None) -> list[Row]:
        if case_id is None:
            return self._rows("SELECT seq, record FROM images WHERE user_id = ? ORDER BY seq", self.user_id)
        return self._rows(
            "SELECT seq, record FROM images WHERE user_id = ? AND case_id = ? ORDER BY seq", self.user_id, case_id
        )

    def image(self, image_id: str) -> Row | None:
        rows = self._rows("SELECT seq, record FROM images WHERE user_id = ? AND image_id = ?", self.user_id, image_id)
        return rows[0] if rows else None

    def cases(self, case_id: str) -> list[Row]:
        return self._rows(
            "SELECT seq, record FROM cases WHERE user_id = ? AND case_id = ? ORDER BY seq", self.user_id, case_id
        )

    def case_rows(self, query: CaseQuery = EVERY_CASE) -> list[CaseRow]:
        # Filtered, ordered and limited by the database, on the indexed columns only: a body
        # is read (and decrypted) once its row is picked.
        where, params = query.where(self.user_id, "?")
        sql = f"SELECT seq, entry_type, status_key, created_at FROM cases{where} ORDER BY created_at DESC, seq DESC"
        if query.limit is not None:
            sql, params = sql + " LIMIT ?", [*params, max(query.limit, 0)]
        return [
            CaseRow((created_at, seq), entry_type, status_key, partial(self._case_body, seq))
            for seq, entry_type, status_key, created_at in self._run(sql, *params).fetchall()
        ]

    def _case_body(self, seq: int) -> dict[str, Any]:
        user_id, body = self._run("SELECT user_id, record FROM cases WHERE seq = ?", seq).fetchone()
        return self.store._load(body, user_id)

    def put_image(self, row: Row) -> None:
        self._run("UPDATE images SET record = ? WHERE seq = ?", self._dumps(row.record), row.key)

    def put_case(self, row: Row) -> None:
        rec = row.record
        self._run(
            "UPDATE cases SET status_key = ?, created_at = ?, record = ? WHERE seq = ?",
            R.status_key(rec.get("status")), R.created_key(rec), self._dumps(rec), row.key,
        )

    def add_case(self, record: dict[str, Any]) -> None:
        self._run(
            "INSERT INTO cases (user_id, case_id, entry_type, status_key, created_at, record) VALUES (?, ?, ?, ?, ?, ?)",
            self.user_id, record["case_id"], record["entry_type"], R.status_key(record.get("status")),
            R.created_key(record), self._dumps(record),
        )

    def delete_case(self, row: Row) -> None:
        self._run("DELETE FROM cases WHERE seq = ?", row.key)

    def enqueue(self, kind: str, ref: str, size_bytes: int) -> None:
        # Inside the section's transaction: the job commits with the record it announces.
        if self.store.outbox_enabled:
            assert self.user_id is not None
            self._enqueue(self.conn, kind, self.user_id, ref, size_bytes)


class PostgresRecords(SQLRecords):
    """The same view on a psycopg connection."""

    mark = "%s"
