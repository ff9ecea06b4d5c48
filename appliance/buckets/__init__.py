"""Buckets: URL parsing, settings and obstore targets, shared by sync (sync/) and model fetching (modelfetch.py).

One module per provider, chosen from the URL through `PROVIDERS` (imported
only when a target is opened, and obstore only then). Adding a provider is one
module with a `Target` subclass, one line here and its URL scheme in `urls.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..importer import import_from_string
from .urls import BucketURL, check_url, parse_url

if TYPE_CHECKING:
    from .config import BucketConfig
    from .target import Target

__all__ = ["PROVIDERS", "BucketURL", "check_url", "open_target", "parse_url"]

PROVIDERS: dict[str, str] = {
    "s3": "appliance.buckets.s3:S3Target",
    "gcs": "appliance.buckets.gcs:GCSTarget",
    "azure": "appliance.buckets.azure:AzureTarget",
}


def open_target(url: str, bucket: BucketConfig, *, max_retries: int = 1) -> Target:
    """The target for a bucket URL; ConfigError for a bad URL or credentials file."""
    from obstore.exceptions import BaseError

    try:
        provider = parse_url(url).provider
        target: Target = import_from_string(PROVIDERS[provider])(url, bucket, max_retries=max_retries)
        return target
    except (ValueError, BaseError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{url}: cannot open the bucket: {first_line}") from None
