"""Records, case-id counters and the sync outbox in PostgreSQL, for many instances sharing one clinic's data.

The same schema idea as sqlite.py: each record table keeps the full record as
JSON text (`record`, sealed when encryption is on, bound to its user) plus the
columns it is looked up by. Image bytes go through an `ImagePlace`
(storage/images.py): files under `root/images` by default, or a bucket; the
record row keeps the image's key.

- **One writing section = one transaction** that first takes
  `pg_advisory_xact_lock` on the user: every write of a user is serialised
  across instances (a counter never issues an id twice, counter_mismatch and
  case_in_use hold, two updates of one case never lose one), and COMMIT happens
  before the method returns. Reading sections take no lock.
- **Migrations** are numbered and append-only, applied at `open()` in one
  transaction holding a constant advisory lock, so instances starting together
  never race; a schema newer than the code is refused.
- **The key check** lives in the database (`key_check`), not in a file under
  one instance's root.
- **Saves** go through the `pending_images` journal: its row commits before the
  bytes are put and goes in the transaction that inserts the record. The saver
  holds a session advisory lock on the pending row while it works, so a sweep
  (at open, and from `stats()` at most once a minute) removes only the leftovers
  of a saver that is gone (crashed, or its connection lost).
- **Outages:** a connection-level failure raises `StoreUnavailable` (503 with
  Retry-After); it is logged once when it starts and once when it ends. The
  pool reconnects by itself.

The DSN's own parameters carry TLS: `sslmode=verify-full&sslrootcert=/path/ca.pem`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import StoreError, StoreUnavailable
from . import StoredImage
from . import records as R
from .base import BaseStore
from .config import StorageConfig, resolve_database_url
from .crypto import image_binding
from .files import check_id, lock_root, make_dir, prepare_root, remove_durable
from .images import ImagePlace, LocalImages, image_key, open_images
from .sqlrecords import PostgresRecords, SQLRecords, now_iso
from .pgschema import MIGRATION_LOCK, SCHEMA_VERSION, check_dsn, check_key, describe_dsn, enqueue, migrate, one_line

if TYPE_CHECKING:
    from ..buckets.config import BucketConfig

log = logging.getLogger("appliance.storage")

IMAGES_DIR = "images"
# Advisory lock keys: hashes of prefixed strings, in the 64-bit key space the migration lock shares
# (a collision only serialises two unrelated writes).
USER_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('appliance-user:' || %s, 0))"
PENDING_KEY = "hashtextextended('appliance-pending:' || %s || '/' || %s, 0)"
SWEEP_INTERVAL_S = 60.0
OUTAGE_WAIT_S = 0.25  # how long a call waits for a pooled connection while the database is known down


class _Health:
    """Logs an outage once when it starts and once when it ends, however many calls fail meanwhile."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.down_since: float | None = None
        self._lock = threading.Lock()

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.error("storage: database %s unavailable: %s", self.label, one_line(error))

    def answered(self) -> None:
        if self.down_since is None:  # the usual case, without taking the lock
            return
        with self._lock:
            if self.down_since is not None:
                log.warning("storage: database %s answers again after %.0f s", self.label,
                            time.monotonic() - self.down_since)
                self.down_since = None


def _connection_lost(error: BaseException) -> bool:
    """True for a failure to reach the server (no connection, class 08, the server shutting down: 57P)."""
    sqlstate = getattr(error, "sqlstate", None)
    return isinstance(error, PoolTimeout) or sqlstate is None or sqlstate.startswith(("08", "57P"))


class PostgresStore(BaseStore):
    """Records in PostgreSQL, image bytes in an ImagePlace; see the module docstring.

    Built as `cls(root, *, database_url=None, statement_timeout_s=5, pool_size=4, images=None, ...)`;
    without `database_url` the DSN comes from DATABASE_URL or the credential. Thread-safe: each
    section takes its own pooled connection.
    """

    name = "postgres"
    outbox_kind = "postgres"
    images_apart = True
    connect_timeout_s = 5

    def __init__(
        self,
        root: Path,
        *,
        database_url: str | None = None,
        statement_timeout_s: float = 5.0,
        pool_size: int = 4,
        images: ImagePlace | None = None,
        **options: Any,
    ) -> None:
        super().__init__(root, **options)
        self.database_url = database_url or resolve_database_url()
        self.statement_timeout_s = float(statement_timeout_s)
        self.pool_size = int(pool_size)
        # Local files by default: then this root is one instance's, and locked like the other stores'.
        self.local_images = images is None
        self.images: ImagePlace = images if images is not None else LocalImages(self.root / IMAGES_DIR)
        self.pool: ConnectionPool | None = None
        check_dsn(self.database_url)
        self.health = _Health(describe_dsn(self.database_url))
        self._next_sweep = 0.0

    @classmethod
    def describe(cls, storage: StorageConfig) -> str:
        """The database (a DSN found and parsable, never its password) and where the images go."""
        dsn = resolve_database_url(storage.database_url, storage.database_url_file)
        check_dsn(dsn)
        images = storage.images_url if storage.images == "bucket" else f"{storage.root}/{IMAGES_DIR}"
        return f"{describe_dsn(dsn)}, images in {images}"

    @classmethod
    def configured(cls, storage: StorageConfig, bucket: BucketConfig) -> dict[str, Any]:
        """The constructor options `storage` sets for this back end: the DSN, timeouts, pool, the image bucket."""
        options: dict[str, Any] = {
            "database_url": resolve_database_url(storage.database_url, storage.database_url_file),
            "statement_timeout_s": storage.statement_timeout_s,
            "pool_size": storage.pool_size,
        }
        if storage.images == "bucket":
            options["images"] = open_images(storage, bucket, storage.root)
        return options

    @staticmethod
    def outbox_at(root: Path) -> Path:
        """The outbox is a table in the database; this names the root it is reported under."""
        return Path(root)

    @property
    def _label(self) -> str:
        return self.health.label

    # -- lifetime -----------------------------------------------------------

    def open(self) -> None:
        """Lock the local root (when images are there), connect, migrate, check the key, sweep."""
        with self._lock:
            if self.pool is not None:
                return
            if self.local_images:
                prepare_root(self.root)
                self._lock_file = lock_root(self.root)
            try:
                if isinstance(self.images, LocalImages):
                    make_dir(self.images.directory)
                self._open_root()
            except (psycopg.Error, PoolTimeout, OSError) as e:
                self._release()
                raise StoreError(f"cannot open store {self._label}: {one_line(e)}") from e
            except BaseException:
                self._release()
                raise

    def _open_root(self) -> None:
        # The pool logs every failed reconnection attempt; the store logs an outage once (_Health).
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        settings: dict[str, Any] = {
            "autocommit": True,  # transactions are explicit: conn.transaction()
            "connect_timeout": self.connect_timeout_s,
            "options": f"-c statement_timeout={int(self.statement_timeout_s * 1000)}",
            "application_name": "appliance",
            # A database host that vanishes (no RST) is noticed in seconds, not after the kernel's TCP
            # timeouts: libpq's keepalives for an idle wait, tcp_user_timeout for unacknowledged sends.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self.connect_timeout_s * 1000),
        }
        # Migrate on a connection of its own: a refused DSN (password, sslmode, sslrootcert) is
        # named by libpq's own error here, where the pool would only say it timed out.
        with psycopg.connect(self.database_url, **settings) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            migrate(conn, self._label)
            check_key(conn, self.sealer, self._label)
        self.pool = ConnectionPool(
            self.database_url,
            min_size=1,
            max_size=max(self.pool_size, 1),
            open=False,
            # A connection that died in an outage is found and replaced before it is handed out.
            check=ConnectionPool.check_connection,
            timeout=self.connect_timeout_s,
            # Give up a failing reconnection soon: the next caller then starts a fresh attempt at once,
            # instead of waiting out the pool's exponential backoff after the database is back.
            reconnect_timeout=self.connect_timeout_s,
            kwargs=settings,
            name="appliance-store",
        )
        self.pool.open(wait=True, timeout=self.connect_timeout_s)
        self.sweep_pending()

    def _close_root(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = None

    @contextlib.contextmanager
    def _using(self, action: str) -> Iterator[None]:
        """On an open store: connection failures become StoreUnavailable (logged once), others StoreError.

        No in-process lock: the pool hands each caller its own connection, and writes are
        serialised per user by the database (USER_LOCK), across every instance.
        """
        if self.pool is None:
            raise StoreError(f"store {self._label} is not open")
        try:
            yield
        except (psycopg.OperationalError, PoolTimeout) as e:
            # A statement timeout or a deadlock is this request's 503, not an outage of the database.
            if _connection_lost(e):
                self.health.failed(e)
            # The client learns only that it may retry; where and why are in the log, once per outage.
            raise StoreUnavailable("the database does not answer; try again later") from e
        except psycopg.Error as e:
            raise StoreError(f"{action} failed in {self._label}: {one_line(e)}") from e
        except OSError as e:
            raise StoreError(f"{action} failed in {self.images.where}: {e}") from e
        self.health.answered()

    def _connection(self) -> contextlib.AbstractContextManager[psycopg.Connection]:
        if self.pool is None:
            raise StoreError(f"store {self._label} is not open")
        # In an outage, answer 503 at once: the app's store calls run one after another on one
        # thread, so waiting connect_timeout_s on each would queue every request behind the others.
        # The pool keeps reconnecting meanwhile; the first call after it succeeds ends the outage.
        wait = self.connect_timeout_s if self.health.down_since is None else OUTAGE_WAIT_S
        return self.pool.connection(timeout=wait)

    @contextlib.contextmanager
    def _section(self, user_id: str | None, write: bool) -> Iterator[SQLRecords]:
        with self._connection() as conn, conn.transaction():
            if write:
                conn.execute(USER_LOCK, (user_id,))
            yield PostgresRecords(self, conn, user_id, enqueue)

    def _user_ids(self) -> list[str]:
        with self._connection() as conn:
            sql = "SELECT user_id FROM images UNION SELECT user_id FROM cases UNION SELECT user_id FROM case_counters"
            return [row[0] for row in conn.execute(sql).fetchall()]

    def _image_file(self, user_id: str, image_id: str) -> Path | None:
        return None  # reseal() below rewrites image bytes through the ImagePlace

    def reseal(self) -> int:
        """Rewrite every record and image of an encrypted store as format v2; how many were rewritten."""
        count = super().reseal()
        if not self.sealer.enabled:
            return count
        with self._using("listing images to re-encrypt"), self._connection() as conn:
            rows = conn.execute("SELECT user_id, image_id, image_key FROM images ORDER BY seq").fetchall()
        for user_id, image_id, key in rows:
            with self._using(f"re-encrypting image {image_id}"):
                data = self.images.get(key)
                if data is not None:
                    ad = image_binding(user_id, image_id)
                    plain = self.sealer.unseal(data, f"{self.images.where}/{key}", ad)
                    self.images.put(key, self.sealer.seal(plain, ad))
                    count += 1
        return count

    def _load(self, body: str, user_id: str) -> dict[str, Any]:
        return self.sealer.loads(body, f"a record in {self._label}", user_id)

    # -- images -------------------------------------------------------------

    def save_image(self, user_id: str, image: StoredImage, record: dict[str, Any]) -> None:
        """Store the bytes and their record durably, or neither (see the module docstring)."""
        check_id("user_id", user_id)
        rec = R.image_record(image, record)
        body = self.sealer.dumps(rec, user_id)
        key = image_key(user_id, image.image_id, image.suffix, sealed=self.sealer.enabled)
        with self._using(f"saving image {image.image_id}"), self._connection() as conn:
            # Held while this save works: a sweep elsewhere leaves its pending row alone.
            conn.execute(f"SELECT pg_advisory_lock({PENDING_KEY})", (user_id, image.image_id))
            try:
                if conn.execute(
                    "SELECT 1 FROM images WHERE user_id = %s AND image_id = %s", (user_id, image.image_id)
                ).fetchone():
                    raise StoreError(f"image {image.image_id} of user {user_id} is already stored")
                conn.execute(
                    "INSERT INTO pending_images (user_id, image_id, image_key, created_at) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (user_id, image_id) DO UPDATE SET image_key = excluded.image_key",
                    (user_id, image.image_id, key, now_iso()),
                )
                try:
                    self.images.put(key, self.sealer.seal(bytes(image.data), image_binding(user_id, image.image_id)))
                    self._commit_image_record(conn, user_id, image, rec, body, key)
                except BaseException:
                    # Best effort; whatever is left is swept later.
                    with contextlib.suppress(Exception):
                        self._discard_pending(conn, user_id, image.image_id, key)
                    raise
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(f"SELECT pg_advisory_unlock({PENDING_KEY})", (user_id, image.image_id))

    def _commit_image_record(
        self, conn: psycopg.Connection, user_id: str, image: StoredImage, rec: dict[str, Any], body: str, key: str
    ) -> None:
        """The commit point of a save: the record appears and the journal row goes, together."""
        with conn.transaction():
            conn.execute(USER_LOCK, (user_id,))
            conn.execute(
                "INSERT INTO images (user_id, image_id, case_id, suffix, size_bytes, created_at, image_key, record)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (user_id, image.image_id, rec.get("case_id"), image.suffix, len(image.data), R.created_key(rec),
                 key, body),
            )
            conn.execute("DELETE FROM pending_images WHERE user_id = %s AND image_id = %s", (user_id, image.image_id))
            if self.outbox_enabled:
                enqueue(conn, "image", user_id, image.image_id, len(image.data) + len(body))

    def _discard_pending(self, conn: psycopg.Connection, user_id: str, image_id: str, key: str) -> None:
        """Remove a pending save's bytes (unless its record did commit) and temp files, then its journal row."""
        committed = conn.execute(
            "SELECT 1 FROM images WHERE user_id = %s AND image_id = %s", (user_id, image_id)
        ).fetchone()
        if not committed:
            self.images.delete(key)
        if isinstance(self.images, LocalImages):
            path = self.images.path(key)
            if path.parent.is_dir():
                remove_durable(list(path.parent.glob(f".{path.name}.*.tmp")))
        conn.execute("DELETE FROM pending_images WHERE user_id = %s AND image_id = %s", (user_id, image_id))

    def sweep_pending(self) -> int:
        """Remove the leftovers of saves whose saver is gone (its pending lock is free); how many."""
        swept = 0
        with self._connection() as conn:
            pending = conn.execute("SELECT user_id, image_id, image_key FROM pending_images").fetchall()
            for user_id, image_id, key in pending:
                got = conn.execute(f"SELECT pg_try_advisory_lock({PENDING_KEY})", (user_id, image_id)).fetchone()
                if not (got and got[0]):
                    continue  # its saver is still at work
                try:
                    self._discard_pending(conn, user_id, image_id, key)
                    swept += 1
                finally:
                    conn.execute(f"SELECT pg_advisory_unlock({PENDING_KEY})", (user_id, image_id))
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        return swept

    def read_image(self, user_id: str, image_id: str) -> bytes | None:
        """The stored bytes of an image, or None if there is no such image record."""
        check_id("user_id", user_id)
        check_id("image_id", image_id)
        with self._using(f"reading image {image_id}"):
            with self._connection() as conn:
                row = conn.execute(
                    "SELECT image_key FROM images WHERE user_id = %s AND image_id = %s", (user_id, image_id)
                ).fetchone()
            if row is None:
                return None
            data = self.images.get(row[0])
            if data is None:  # a record without its bytes is damage, not absence: say so
                raise StoreError(f"image {image_id} of user {user_id} has a record but no bytes at {row[0]}")
            return self.sealer.unseal(data, f"{self.images.where}/{row[0]}", image_binding(user_id, image_id))

    # -- status -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Backend, root, record counts and image bytes; StoreUnavailable while the database or image bucket is down."""
        self.images.check()
        with self._using("reading store stats"):
            if time.monotonic() >= self._next_sweep:
                self.sweep_pending()
            with self._connection() as conn:
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM images), (SELECT coalesce(sum(size_bytes), 0) FROM images),"
                    " (SELECT count(*) FROM cases), (SELECT count(*) FROM case_counters),"
                    " (SELECT count(*) FROM pending_images)"
                ).fetchone()
        assert row is not None
        images, image_bytes, cases, users, pending = (int(v) for v in row)
        return {
            "backend": self.name,
            "root": str(self.root),
            "database": self._label,
            "images": images,
            "cases": cases,
            "image_bytes": image_bytes,
            "users_with_counters": users,
            "pending_images": pending,
            "schema_version": SCHEMA_VERSION,
            "pool_size": self.pool_size,
        }
