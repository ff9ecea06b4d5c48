"""The [bucket] section: how the appliance reaches its buckets, for sync and model fetching alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..settings import seconds


@dataclass(frozen=True)
class BucketConfig:
    """How the appliance reaches its buckets (sync.url, model.url); secrets only by path or environment."""

    endpoint: str = ""
    region: str = ""
    account: str = ""
    credentials_file: Path | None = None
    allow_http: bool = False
    timeout_s: float = seconds(60.0)

