"""Sync status without a running worker: for `appliance sync status` and a disabled sync."""

from __future__ import annotations

from typing import Any

from ..storage import outbox_kind, outbox_location
from ..storage.config import StorageConfig
from .config import SyncConfig
from .outbox import read_backlog_at


def disabled_status() -> dict[str, Any]:
    """What /ready and /v1/info say when sync is off."""
    return {"enabled": False}


def offline_status(storage: StorageConfig, sync: SyncConfig) -> dict[str, Any]:
    """The outbox's numbers read straight from its file (read-only; works while the server runs)."""
    if outbox_kind(storage.backend) == "postgres":
        from .pgoutbox import offline, read_backlog

        where, backlog = offline(storage, read_backlog)
        return {"enabled": sync.enabled, "url": sync.url, "outbox": where, **backlog.as_dict()}
    path = outbox_location(storage.backend, storage.root)
    backlog = read_backlog_at(path)
    return {"enabled": sync.enabled, "url": sync.url, "outbox": str(path), **backlog.as_dict()}
