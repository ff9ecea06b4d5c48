"""The [sync] section's checks (sync/config.py): every error names its key."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError


@pytest.mark.parametrize(("raw", "message"), [
    ({"sync": {"enabled": True}}, "sync.url: expected a bucket URL (s3://, gs://, az:// or https://) when sync.enabled = true"),
    ({"sync": {"enabled": True, "url": "ftp://x/y"}},
     "sync.url: expected s3://, gs://, az:// or an https URL of S3, Google Cloud Storage or Azure Blob; got 'ftp://x/y'"),
    ({"sync": {"retry_max_s": 301}},
     "sync.retry_base_s, sync.retry_max_s: expected 0 < base <= max <= 300 seconds; got 1.0, 301.0"),
    ({"sync": {"box_id": "a/b"}}, "sync.box_id: expected letters, digits, '-' and '_'; got 'a/b'"),
    ({"sync": {"when_over_budget": "drop"}}, "sync.when_over_budget: expected one of refuse, accept; got 'drop'"),
    ({"sync": {"max_concurrency": 0}}, "sync.max_concurrency: expected a positive number; got 0"),
    ({"sync": {"disk_budget_bytes": -1}}, "sync.disk_budget_bytes: expected 0 (no budget) or more; got -1"),
])
def test_bad_sync_config_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.detail == message
