"""`appliance sync --once`, `appliance sync status` and `appliance sync retry`."""

from __future__ import annotations

import asyncio
import json
import sys

from ..buckets.config import BucketConfig
from ..errors import ConfigError
from ..storage.config import StorageConfig
from ..storage import outbox_kind, outbox_location
from .config import SyncConfig
from .outbox import retry_dead_letters
from .status import offline_status


def sync_command(
    storage: StorageConfig, sync: SyncConfig, bucket: BucketConfig, *, status: bool, once: bool, retry: bool = False
) -> int:
    """Run the CLI's sync action; the exit status."""
    if status + once + retry != 1:
        raise ConfigError("appliance sync: say one of --once, status or retry")
    if status:
        print(json.dumps(offline_status(storage, sync), indent=2))
        return 0
    if retry:
        if outbox_kind(storage.backend) == "postgres":
            from .pgoutbox import offline, retry_dead_letters as retry_in_table

            where, count = offline(storage, retry_in_table)
        else:
            path = outbox_location(storage.backend, storage.root)
            where, count = str(path), retry_dead_letters(path)
        print(f"{count} dead-lettered sync jobs in {where} are due again (with {sync.max_attempts} fresh attempts)")
        return 0
    if not sync.url:
        raise ConfigError("sync.url: expected a bucket URL to drain to")
    return asyncio.run(_drain(storage, sync, bucket))


async def _drain(storage: StorageConfig, sync: SyncConfig, bucket: BucketConfig) -> int:
    from ..storage import open_configured_store
    from .worker import create_worker

    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(None, lambda: open_configured_store(storage, outbox=True, bucket=bucket))
    try:
        worker = await loop.run_in_executor(None, create_worker, sync, bucket, store)
        try:
            error = await worker.drain_once()
            numbers = worker.status()
        finally:
            await worker.stop(sync.shutdown_timeout_s)
    finally:
        await loop.run_in_executor(None, store.close)
    summary = (f"uploaded {numbers['uploaded_objects']} objects to {sync.url}; "
               f"{numbers['backlog']} jobs ({numbers['bytes_pending']} bytes) waiting")
    if error is not None:
        print(f"appliance: sync stopped at an error: {error}; {summary}", file=sys.stderr)
        return 1
    print(summary)
    return 0
