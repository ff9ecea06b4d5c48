"""Sync status without a running worker: for `appliance sync status` and a disabled sync."""

from __future__ import annotations

from typing import Any

from ..storage import outbox_location
from .outbox import read_backlog_at


def disabled_status() -> dict[str, Any]:
    """What /ready and /v1/info say when sync is off."""
    return {"enabled": False}


def offline_status(config: Any) -> dict[str, Any]:
    """The outbox's numbers read straight from its file (read-only; works while the server runs)."""
    path = outbox_location(config.storage.backend, config.storage.root)
    backlog = read_backlog_at(path)
    return {"enabled": config.sync.enabled, "url": config.sync.url, "outbox": str(path), **backlog.as_dict()}
