"""Issue 13, sync: every job's bytes count against the budget; a job that never succeeds becomes a visible dead letter."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.__main__ import build_parser
from appliance.app import create_app
from appliance.cases import log_case
from appliance.config import Config
from appliance.keys import STORE
from appliance.storage import BACKENDS, open_store
from appliance.storage import records as R
from appliance.storage.outbox import connect, enqueue
from appliance.sync.commands import sync_command
from appliance.sync.outbox import Outbox, read_backlog_at, retry_dead_letters

from .buckets import Bucket, Server
from .conftest import encode, photo
from .stores import case_record, outbox_rows, save
from .test_sync import check, sync_overrides

OLD_SCHEMA = """CREATE TABLE outbox (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, user_id TEXT NOT NULL,
    ref TEXT NOT NULL, size_bytes INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 1, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT, failed_at REAL, UNIQUE (kind, user_id, ref))"""


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_image_record_jobs_count_their_bytes(backend: str, tmp_path: Path) -> None:
    store = open_store(backend, tmp_path / "store", outbox=True)
    try:
        save(store, "img-1", "10000")
        log_case(store, "user001", case_record("10000", notes="looked at", user_id="user001"))
        record = store.image_record("user001", "img-1")
    finally:
        store.close()
    sizes = dict(outbox_rows(backend, store.outbox_path, "SELECT kind, size_bytes FROM outbox"))
    assert record is not None and sizes["image_record"] == len(R.dumps(record))  # was 0 before issue 13
    assert all(size > 0 for size in sizes.values()), sizes


def test_a_job_at_max_attempts_is_parked_kept_and_retried_on_request(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    conn = connect(tmp_path / "outbox.db")
    enqueue(conn, "image", "u1", "img-1", 100)
    (job,) = outbox.due(1000.0, 10)
    outbox.failed(job, "GenericError: 403", now=1000.0, retry_at=1001.0, dead=True)
    assert outbox.due(1e12, 10) == [] and outbox.next_due_at() is None
    backlog = outbox.backlog()
    assert (backlog.jobs, backlog.bytes_pending, backlog.dead_letters) == (1, 100, 1)  # never dropped
    assert retry_dead_letters(tmp_path / "outbox.db") == 1
    (again,) = outbox.due(1000.0, 10)
    assert (again.attempts, outbox.backlog().dead_letters) == (0, 0)
    conn.close()
    outbox.close()


def test_a_changed_dead_letter_is_live_again(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    conn = connect(tmp_path / "outbox.db")
    enqueue(conn, "case", "u1", "10000", 10)
    (job,) = outbox.due(1000.0, 10)
    outbox.failed(job, "GenericError: 403", now=1000.0, retry_at=1001.0, dead=True)
    enqueue(conn, "case", "u1", "10000", 12)  # the record changed: the next upload may succeed
    (again,) = outbox.due(1000.0, 10)
    assert (again.version, again.attempts, outbox.backlog().dead_letters) == (2, 0, 0)
    conn.close()
    outbox.close()


def test_an_outbox_from_before_dead_letters_is_read_and_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute(OLD_SCHEMA)
        conn.execute("INSERT INTO outbox (kind, user_id, ref, size_bytes, created_at) VALUES ('case', 'u1', '1', 5, 1)")
    conn.close()
    assert (read_backlog_at(path).jobs, read_backlog_at(path).dead_letters) == (1, 0)  # read-only: no column yet
    outbox = Outbox(path)
    try:
        (job,) = outbox.due(time.time(), 10)  # the old job is kept and acknowledged as before
        assert (job.kind, job.user_id, job.ref) == ("case", "u1", "1") and outbox.done(job) is True
    finally:
        outbox.close()


def test_sync_retry_is_a_cli_action() -> None:
    assert build_parser().parse_args(["sync", "retry"]).action == "retry"


async def test_a_job_that_never_succeeds_becomes_a_visible_dead_letter_and_sync_retry_revives_it(
        aiohttp_client: Any, make_config: Callable[..., Config], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bucket = Bucket(Server("s3", tmp_path / "moto"), "nowhere", tmp_path)  # never started: every upload fails
    config = make_config(**sync_overrides(bucket, sync__max_attempts=2, bucket__timeout_s=2.0))
    client = await aiohttp_client(create_app(config))
    await check(client, encode(photo(seed=1)))
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while status.get("dead_letters") != 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status = (await (await client.get("/v1/status")).json())["sync"]
    assert status["dead_letters"] == 1 and status["backlog"] == 1 and status["state"] == "failing"
    metrics = await (await client.get("/metrics")).text()
    assert "appliance_sync_dead_letters 1.0" in metrics
    page = await (await client.get("/")).text()
    assert 'id="sync-dead"' in page
    await asyncio.sleep(0.5)  # several retry intervals (retry_max_s = 0.5): a dead letter is not tried again
    outbox_path = client.app[STORE].outbox_path
    with sqlite3.connect(outbox_path) as conn:
        attempts = conn.execute("SELECT attempts, dead_at IS NOT NULL FROM outbox").fetchall()
    conn.close()
    assert attempts == [(2, 1)]
    await client.close()
    assert sync_command(config.storage, config.sync, config.bucket, status=False, once=False, retry=True) == 0
    assert capsys.readouterr().out.startswith("1 dead-lettered sync jobs in ")
    assert sync_command(config.storage, config.sync, config.bucket, status=True, once=False) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["backlog"], printed["dead_letters"]) == (1, 0)
