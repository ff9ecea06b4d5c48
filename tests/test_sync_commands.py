"""`appliance sync status` and `appliance sync --once`, against a real store and an unreachable bucket."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable

import pytest

from appliance.config import Config
from appliance.storage import open_store
from appliance.sync.commands import sync_command

from .buckets import Bucket, Server
from .stores import save
from .test_sync import sync_overrides


def test_sync_status_command_reads_the_outbox_while_the_store_is_open(
        make_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = Bucket(Server("s3", tmp_path / "moto"), "nowhere", tmp_path)
    config = make_config(**sync_overrides(bucket))
    store = open_store("sqlite", config.storage.root, outbox=True)
    try:
        save(store, "img-1", "10000")
        assert sync_command(config.storage, config.sync, config.bucket, status=True, once=False) == 0
    finally:
        store.close()
    printed = json.loads(capsys.readouterr().out)
    assert printed["backlog"] == 1 and printed["bytes_pending"] > 0 and printed["enabled"] is True
    assert printed["oldest_pending"] is not None and printed["last_error"] is None


def test_sync_once_exits_1_with_the_error_when_the_bucket_is_unreachable(
        make_config: Callable[..., Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = Bucket(Server("s3", tmp_path / "moto"), "nowhere", tmp_path)
    config = make_config(**sync_overrides(bucket, bucket__timeout_s=2.0))
    store = open_store("sqlite", config.storage.root, outbox=True)
    save(store, "img-1", "10000")
    store.close()
    assert sync_command(config.storage, config.sync, config.bucket, status=False, once=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("appliance: sync stopped at an error: image user001/img-1: ")
    assert "; uploaded 0 objects to s3://nowhere/clinic; 1 jobs (" in err
