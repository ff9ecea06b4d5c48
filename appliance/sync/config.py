"""The [sync] section: store-and-forward upload to a bucket, and the checks on its keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..buckets import check_url
from ..errors import ConfigError
from ..settings import Check, positive, seconds, setting


@dataclass(frozen=True)
class SyncConfig:
    """Store-and-forward upload of images and records to a bucket (appliance/sync/)."""

    enabled: bool = False
    url: str = ""
    box_id: str = ""
    max_concurrency: int = positive(4)
    poll_interval_s: float = seconds(2.0)
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    disk_budget_bytes: int = setting(0, Check("0 (no budget) or more", at_least=0))
    when_over_budget: Literal["refuse", "accept"] = "refuse"
    shutdown_timeout_s: float = seconds(5.0)
    # Failed attempts before a job becomes a dead letter (kept, shown, retried by `appliance sync retry`).
    max_attempts: int = setting(300, Check("0 (retry forever) or more", at_least=0))


def check_sync(sync: SyncConfig) -> None:
    """Sync on needs a bucket URL this appliance can reach; the box id's characters; the retry bounds."""
    if sync.enabled:
        if not sync.url:
            raise ConfigError("sync.url: expected a bucket URL (s3://, gs://, az:// or https://) when sync.enabled = true")
        check_url(sync.url, "sync.url")
    if sync.box_id and not all(c.isascii() and (c.isalnum() or c in "-_") for c in sync.box_id):
        raise ConfigError(f"sync.box_id: expected letters, digits, '-' and '_'; got {sync.box_id!r}")
    # The bound: retries at most 5 minutes apart, whatever the config says.
    if not 0 < sync.retry_base_s <= sync.retry_max_s <= 300:
        raise ConfigError(
            f"sync.retry_base_s, sync.retry_max_s: expected 0 < base <= max <= 300 seconds;"
            f" got {sync.retry_base_s!r}, {sync.retry_max_s!r}"
        )
