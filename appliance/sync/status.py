"""Sync status without a running worker: for `appliance sync status` and a disabled sync."""

from __future__ import annotations

from typing import Any

from ..importer import import_from_string
from ..storage import BACKENDS
from .outbox import read_backlog_at


def disabled_status() -> dict[str, Any]:
    """What /ready and /v1/info say when sync is off."""
    return {"enabled": False}


def offline_status(config: Any) -> dict[str, Any]:
    """The outbox's numbers read straight from its file (read-only; works while the server runs)."""
    store_class = import_from_string(BACKENDS[config.storage.backend])
    # Building a store does not open it: this only asks where its outbox lives.
    path = store_class(config.storage.root).outbox_path
    backlog = read_backlog_at(path)
    return {"enabled": config.sync.enabled, "url": config.sync.url, "outbox": str(path), **backlog.as_dict()}
