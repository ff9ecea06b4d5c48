"""Bucket URLs and the target registry (the targets themselves are exercised against emulators in test_sync.py)."""

from __future__ import annotations

import pytest

from appliance.buckets import PROVIDERS, parse_url
from appliance.buckets.target import Target
from appliance.buckets.urls import PROVIDER_SCHEMES
from appliance.importer import import_from_string


@pytest.mark.parametrize(("url", "provider", "bucket", "prefix", "account"), [
    ("s3://clinic-data/eu/boxes", "s3", "clinic-data", "eu/boxes", ""),
    ("gs://clinic-data", "gcs", "clinic-data", "", ""),
    ("az://container/p", "azure", "container", "p", ""),
    ("https://clinic-data.s3.eu-central-1.amazonaws.com/p/q", "s3", "clinic-data", "p/q", ""),
    ("https://s3.eu-central-1.amazonaws.com/clinic-data/p", "s3", "clinic-data", "p", ""),
    ("https://storage.googleapis.com/clinic-data/p", "gcs", "clinic-data", "p", ""),
    ("https://acct.blob.core.windows.net/container/p", "azure", "container", "p", "acct"),
])
def test_bucket_urls(url: str, provider: str, bucket: str, prefix: str, account: str) -> None:
    parsed = parse_url(url)
    assert (parsed.provider, parsed.bucket, parsed.prefix, parsed.account) == (provider, bucket, prefix, account)


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_every_registered_target_is_a_target_with_a_url_scheme(provider: str) -> None:
    target = import_from_string(PROVIDERS[provider])
    assert issubclass(target, Target) and target.provider == provider
    assert provider in PROVIDER_SCHEMES.values()
