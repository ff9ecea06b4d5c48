"""`appliance sync --once` and `appliance sync status`."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from ..errors import ConfigError
from .status import offline_status


def sync_command(config: Any, *, status: bool, once: bool) -> int:
    """Run the CLI's sync action; the exit status."""
    if status == once:
        raise ConfigError("appliance sync: say either --once or status")
    if status:
        print(json.dumps(offline_status(config), indent=2))
        return 0
    if not config.sync.url:
        raise ConfigError("sync.url: expected a bucket URL to drain to")
    return asyncio.run(_drain(config))


async def _drain(config: Any) -> int:
    from ..storage import open_configured_store
    from .worker import create_worker

    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(None, lambda: open_configured_store(config, outbox=True))
    try:
        worker = await loop.run_in_executor(None, create_worker, config, store)
        try:
            error = await worker.drain_once()
            numbers = worker.status()
        finally:
            await worker.stop(config.sync.shutdown_timeout_s)
    finally:
        await loop.run_in_executor(None, store.close)
    summary = (f"uploaded {numbers['uploaded_objects']} objects to {config.sync.url}; "
               f"{numbers['backlog']} jobs ({numbers['bytes_pending']} bytes) waiting")
    if error is not None:
        print(f"appliance: sync stopped at an error: {error}; {summary}", file=sys.stderr)
        return 1
    print(summary)
    return 0
