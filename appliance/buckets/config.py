"""The [bucket] section: how the appliance reaches its buckets, for sync and model fetching alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class BucketConfig:
    """How the appliance reaches its buckets (sync.url, model.url); secrets only by path or environment."""

    endpoint: str = ""
    region: str = ""
    account: str = ""
    credentials_file: Path | None = None
    allow_http: bool = False
    timeout_s: float = 60.0


def check_bucket(bucket: BucketConfig) -> None:
    """Refuse a timeout that is not a positive number of seconds, naming the key."""
    if bucket.timeout_s <= 0:
        raise ConfigError(f"bucket.timeout_s: expected a positive number of seconds; got {bucket.timeout_s!r}")
