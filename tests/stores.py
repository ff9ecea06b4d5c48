"""Store fixtures and record factories shared by the storage, case-rule and sync tests.

`backend` is parametrized over `storage.BACKENDS`, so every test that takes
`store` or `make_store` runs against every registered back end: a new store
gets the whole contract suite by its registry line alone.
"""

from __future__ import annotations

import io
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from appliance.cases import list_cases
from appliance.storage import BACKENDS, Store, StoredImage, open_store, outbox_kind
from appliance.storage.outbox import connect, enqueue

USER = "user001"
OTHER = "user002"
Factory = Callable[..., Store]


def image_bytes(fmt: str = "JPEG", *, seed: int = 0) -> bytes:
    """Real encoded image bytes, different for each seed."""
    img = Image.new("RGB", (32, 24), (120 + seed, 80, 60))
    img.putpixel((seed % 32, 3), (255, 255, 255))
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


JPEG = image_bytes("JPEG")


def image_record(image_id: str, case_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "image_id": image_id,
        "blur_score": 253.17,
        "predictions": [{"label": "nv", "confidence": 0.9}, {"label": "bkl", "confidence": 0.1}],
        "status": "success",
        "created_at": "2026-01-01T10:00:00+00:00",
        "user_id": USER,
        "user_role": "gp",
        **extra,
    }


def case_record(case_id: str, entry_type: str = "case", **extra: Any) -> dict[str, Any]:
    rec = {
        "entry_type": entry_type,
        "case_id": case_id,
        "user_id": USER,
        "user_role": "gp",
        "created_at": "2026-01-01T10:05:00+00:00",
        "status": "rejected" if entry_type == "reject" else "pending",
    }
    rec.update(extra)
    return rec


def save(store: Store, image_id: str, case_id: str, *, user: str = USER, data: bytes = JPEG,
         suffix: str = ".jpg", **extra: Any) -> None:
    store.save_image(user, StoredImage(image_id, data, suffix), image_record(image_id, case_id, user_id=user, **extra))


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def make_store(backend: str, root: Path) -> Iterator[Factory]:
    """`make_store(**options)`: open the back end on `root` (again); every store is closed at teardown."""
    opened: list[Store] = []

    def make(**options: Any) -> Store:
        store = open_store(backend, options.pop("root", root), **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: Factory) -> Store:
    return make_store()


def store_of(backend: str) -> Any:
    """A fixture opening one named back end on `root`, for that back end's own layout tests."""

    @pytest.fixture
    def one_store(root: Path) -> Iterator[Store]:
        store = open_store(backend, root)
        yield store
        store.close()

    return one_store


def reopen(store: Store, make_store: Factory) -> Store:
    store.close()
    return make_store()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def listed(store: Store, user: str | None = USER, **options: Any) -> list[tuple[str, str]]:
    defaults: dict[str, Any] = {"status": None, "limit": 100, "include_uncertain": True, "include_rejected": True}
    records = list_cases(store, user, **{**defaults, **options})
    return [(r["case_id"], r["entry_type"]) for r in records]


def outbox_rows(backend: str, outbox_path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on a store's sync outbox, wherever it lives: its SQLite file or (postgres) its table."""
    if outbox_kind(backend) == "postgres":
        import psycopg

        with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
            return list(conn.execute(sql).fetchall())
    conn = sqlite3.connect(outbox_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def requeue(backend: str, outbox_path: Path, jobs: list[tuple[str, str, str, int]]) -> None:
    """Enqueue (kind, user, ref, size) jobs again in one transaction, as a store does (a re-drain after a crash)."""
    if outbox_kind(backend) == "postgres":
        import psycopg

        from appliance.storage.postgres import enqueue as enqueue_row

        with psycopg.connect(os.environ["DATABASE_URL"]) as pg, pg.transaction():
            for job in jobs:
                enqueue_row(pg, *job)
        return
    conn = connect(outbox_path)
    conn.execute("BEGIN IMMEDIATE")
    for job in jobs:
        enqueue(conn, *job)
    conn.execute("COMMIT")
    conn.close()
