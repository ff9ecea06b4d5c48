"""The sqlite store's own layout: a WAL database beside image files, and its migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.cases import next_case_id
from appliance.errors import StoreError
from appliance.storage import Store, open_store

from . import stores
from .stores import USER, image_bytes, save

# The store root, and the sqlite store on it (tests/stores.py).
root = stores.root
sqlite_store = stores.store_of("sqlite")


# -- the sqlite layout ----------------------------------------------------------


def test_sqlite_keeps_images_as_files_and_records_in_a_wal_database(sqlite_store: Store, root: Path) -> None:
    save(sqlite_store, "img-1", "10000", data=image_bytes("WEBP"), suffix=".webp")
    assert (root / "images" / USER / "img-1.webp").read_bytes() == image_bytes("WEBP")
    with sqlite3.connect(root / "appliance.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert [v for (v,) in conn.execute("SELECT version FROM schema_migrations")] == [1, 2]
        assert conn.execute("SELECT count(*) FROM pending_files").fetchone() == (0,)
        assert conn.execute("SELECT image_id, size_bytes FROM images").fetchall() == [
            ("img-1", len(image_bytes("WEBP")))]
    conn.close()


def test_sqlite_refuses_a_database_from_a_newer_appliance(sqlite_store: Store, root: Path) -> None:
    sqlite_store.close()
    conn = sqlite3.connect(root / "appliance.db")
    with conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, '2030-01-01')")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        open_store("sqlite", root)


def test_sqlite_refuses_a_file_that_is_not_a_database(root: Path) -> None:
    root.mkdir()
    (root / "appliance.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="appliance.db"):
        open_store("sqlite", root)


def test_sqlite_migrations_run_once(sqlite_store: Store, root: Path) -> None:
    next_case_id(sqlite_store, USER)
    sqlite_store.close()
    store = open_store("sqlite", root)
    try:
        assert next_case_id(store, USER) == "10001"
    finally:
        store.close()
    with sqlite3.connect(root / "appliance.db") as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (2,)
    conn.close()
