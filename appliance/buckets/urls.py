"""Bucket URLs: which provider, bucket (or container), key prefix and, for Azure, account a URL names.

Accepted URLs::

    s3://bucket/prefix     https://bucket.s3.<region>.amazonaws.com/prefix
                           https://s3.<region>.amazonaws.com/bucket/prefix
    gs://bucket/prefix     https://storage.googleapis.com/bucket/prefix
    az://container/prefix  https://<account>.blob.core.windows.net/container/prefix
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ConfigError

# URL scheme -> provider (a key of buckets.PROVIDERS).
PROVIDER_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "az": "azure", "azure": "azure"}


@dataclass(frozen=True)
class BucketURL:
    """A parsed bucket URL: provider, bucket (or container), key prefix and, for Azure, the account."""

    provider: str
    bucket: str
    prefix: str
    account: str = ""


def parse_url(url: str) -> BucketURL:
    """Split a bucket URL; ValueError naming what is wrong."""
    parts = urlsplit(url.strip())
    scheme, host, path = parts.scheme.lower(), parts.netloc, parts.path.strip("/")
    if scheme in PROVIDER_SCHEMES:
        if not host:
            raise ValueError(f"expected {scheme}://<bucket>/<prefix>; got {url!r}")
        return BucketURL(PROVIDER_SCHEMES[scheme], host, path)
    if scheme == "https":
        first, _, rest = path.partition("/")
        if host.endswith(".amazonaws.com"):
            if host.startswith("s3.") or host.startswith("s3-"):
                return _checked(BucketURL("s3", first, rest), url)
            return _checked(BucketURL("s3", host.split(".s3.")[0].split(".s3-")[0], path), url)
        if host == "storage.googleapis.com":
            return _checked(BucketURL("gcs", first, rest), url)
        if host.endswith(".blob.core.windows.net"):
            return _checked(BucketURL("azure", first, rest, account=host.split(".")[0]), url)
    raise ValueError(
        f"expected s3://, gs://, az:// or an https URL of S3, Google Cloud Storage or Azure Blob; got {url!r}"
    )


def _checked(parsed: BucketURL, url: str) -> BucketURL:
    if not parsed.bucket:
        raise ValueError(f"no bucket or container in {url!r}")
    return parsed


def check_url(url: str, key: str) -> BucketURL:
    """parse_url for config checks: a ConfigError naming the key."""
    try:
        return parse_url(url)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
