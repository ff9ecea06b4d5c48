"""The sync outbox: jobs written through storage.outbox, drained through sync.outbox, found without a store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.storage import BACKENDS, open_store, outbox_kind, outbox_location
from appliance.storage.outbox import connect, enqueue
from appliance.sync.outbox import Outbox


def test_outbox_coalesces_a_waiting_job_and_keeps_a_change_made_during_upload(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    conn = connect(tmp_path / "outbox.db")
    enqueue(conn, "case", "u1", "10000", 10)
    enqueue(conn, "case", "u1", "10000", 12)  # the same case again: one job, newer version
    (job,) = outbox.due(time.time(), 10)
    assert (job.version, job.size_bytes) == (2, 12)
    enqueue(conn, "case", "u1", "10000", 14)  # changed while "uploading"
    assert outbox.done(job) is False  # kept, to upload the change
    (again,) = outbox.due(time.time(), 10)
    assert again.version == 3 and outbox.done(again) is True
    assert outbox.due(time.time(), 10) == [] and outbox.backlog().jobs == 0
    conn.close()
    outbox.close()


def test_a_failed_job_waits_for_its_retry_time_and_is_never_dropped(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    conn = connect(tmp_path / "outbox.db")
    enqueue(conn, "image", "u1", "img-1", 100)
    (job,) = outbox.due(1000.0, 10)
    outbox.failed(job, "GenericError: connection refused", now=1000.0, retry_at=1060.0)
    assert outbox.due(1059.0, 10) == []
    assert [j.attempts for j in outbox.due(1060.0, 10)] == [1]
    backlog = outbox.backlog()
    assert (backlog.jobs, backlog.bytes_pending, backlog.failing_jobs) == (1, 100, 1)
    assert backlog.last_error == "GenericError: connection refused"
    conn.close()
    outbox.close()


# The back ends whose outbox is a SQLite file (postgres keeps it in a table: tests/test_storage_postgres.py).
@pytest.mark.parametrize("backend", sorted(b for b in BACKENDS if outbox_kind(b) == "sqlite"))
def test_the_outbox_location_is_known_without_building_a_store(backend: str, tmp_path: Path) -> None:
    store = open_store(backend, tmp_path / "store", outbox=True)
    try:
        assert outbox_location(backend, tmp_path / "store") == store.outbox_path
        assert store.outbox_path.is_file()
    finally:
        store.close()
