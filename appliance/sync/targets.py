"""Bucket targets: a URL becomes an obstore store, with each provider's credentials and checksum.

One class per provider, chosen from the URL by `PROVIDERS` (obstore is
imported only when a target is opened). Accepted URLs::

    s3://bucket/prefix     https://bucket.s3.<region>.amazonaws.com/prefix
                           https://s3.<region>.amazonaws.com/bucket/prefix
    gs://bucket/prefix     https://storage.googleapis.com/bucket/prefix
    az://container/prefix  https://<account>.blob.core.windows.net/container/prefix

Credentials come from the provider's usual sources, which obstore reads itself
(environment variables, instance / workload identity), or from
`bucket.credentials_file`; never from config.toml. Every upload carries the
object's sha256 as user metadata (`sha256`) and is checked as each provider
allows (see each class's docstring).
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ApplianceError, ConfigError

if TYPE_CHECKING:
    # obstore declares these TypedDicts only in its stubs: not importable at run time.
    from obstore.store import ClientConfig, RetryConfig

_MD5_HEX = re.compile(r"[0-9a-f]{32}")


class IntegrityError(ApplianceError):
    """An uploaded object does not match the bytes sent (checksum mismatch)."""


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


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


class Target:
    """One bucket prefix reached through obstore; `put` uploads and checks, raising on any failure."""

    provider = ""

    def __init__(self, url: str, bucket: Any, *, max_retries: int = 1) -> None:
        self.url = url
        self.where = parse_url(url)
        self.config = bucket  # a config.BucketConfig
        client: ClientConfig = {"timeout": timedelta(seconds=bucket.timeout_s),
                                "connect_timeout": timedelta(seconds=min(10.0, bucket.timeout_s))}
        if bucket.allow_http:
            client["allow_http"] = True
        # Few retries inside obstore: the sync worker has its own backoff, and a
        # start-up fetch must fail fast to fall back on its cached copy.
        retry: RetryConfig = {"max_retries": max_retries, "retry_timeout": timedelta(seconds=bucket.timeout_s)}
        self.store = self._open_store(client, retry)

    def _open_store(self, client: ClientConfig, retry: RetryConfig) -> Any:
        raise NotImplementedError

    def _credentials_file_text(self) -> str | None:
        path = self.config.credentials_file
        if path is None:
            return None
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"bucket.credentials_file: cannot read {path}: {e.strerror}") from None

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload `data` at `key` (overwriting), then check it arrived intact."""
        import obstore

        digest = sha256_hex(data)
        result = await obstore.put_async(
            self.store, key, data, attributes={"Content-Type": content_type, "sha256": digest},
            use_multipart=False,
        )
        await self._verify(key, data, digest, result.get("e_tag"))

    async def _verify(self, key: str, data: bytes, digest: str, e_tag: str | None) -> None:
        """Default check: read the object back and compare its sha256."""
        back = await self.get(key)
        if sha256_hex(back) != digest:
            raise IntegrityError(f"{key}: read back sha256 {sha256_hex(back)} differs from the uploaded {digest}")

    def _check_md5_etag(self, key: str, data: bytes, e_tag: str | None) -> bool:
        """True when the ETag is a plain MD5 and equals the data's; IntegrityError when it differs."""
        tag = (e_tag or "").strip('"').lower()
        if not _MD5_HEX.fullmatch(tag):
            return False
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if tag != md5:
            raise IntegrityError(f"{key}: the bucket's MD5 ETag {tag} differs from the uploaded bytes' {md5}")
        return True

    async def get(self, key: str) -> bytes:
        """The object's bytes."""
        import obstore

        result = await obstore.get_async(self.store, key)
        return bytes(await result.bytes_async())

    def get_sync(self, key: str) -> bytes:
        """The object's bytes, blocking (for start-up work in an executor)."""
        import obstore

        return bytes(obstore.get(self.store, key).bytes())

    def list_sync(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (relative to the target's prefix), blocking."""
        import obstore

        return [meta["path"] for batch in obstore.list(self.store, prefix or None) for meta in batch]

    def describe(self) -> dict[str, Any]:
        """Provider, bucket and prefix; never credentials."""
        return {"provider": self.provider, "bucket": self.where.bucket, "prefix": self.where.prefix,
                "checksum": self.checksum}

    checksum = "sha256 metadata, read back"


class S3Target(Target):
    """Amazon S3 and compatibles: S3 checks the x-amz-checksum-sha256 sent with each PUT and
    refuses a mismatch; the MD5 ETag of a plain PUT is compared too (skipped when SSE-KMS makes
    the ETag opaque). Credentials: AWS_* variables, web identity, ECS / EC2 instance roles, or
    `bucket.credentials_file` as an AWS shared-credentials file (profile AWS_PROFILE or default)."""

    provider = "s3"
    checksum = "x-amz-checksum-sha256 (checked by S3) + MD5 ETag + sha256 metadata"

    def _open_store(self, client: ClientConfig, retry: RetryConfig) -> Any:
        from obstore.store import S3Store

        options: dict[str, Any] = {"checksum_algorithm": "sha256"}
        if self.config.endpoint:
            options["endpoint"] = self.config.endpoint
        if self.config.region:
            options["region"] = self.config.region
        text = self._credentials_file_text()
        if text is not None:
            parser = configparser.ConfigParser()
            try:
                parser.read_string(text)
            except configparser.Error as e:
                raise ConfigError(f"bucket.credentials_file: not an AWS credentials file: {e}") from None
            profile = os.environ.get("AWS_PROFILE", "default")
            if not parser.has_section(profile) or not parser.has_option(profile, "aws_access_key_id"):
                raise ConfigError(f"bucket.credentials_file: no [{profile}] with aws_access_key_id in "
                                  f"{self.config.credentials_file}")
            section = parser[profile]
            options["access_key_id"] = section["aws_access_key_id"]
            options["secret_access_key"] = section.get("aws_secret_access_key", "")
            if section.get("aws_session_token"):
                options["token"] = section["aws_session_token"]
        return S3Store(self.where.bucket, prefix=self.where.prefix or None, client_options=client,
                       retry_config=retry, **options)

    async def _verify(self, key: str, data: bytes, digest: str, e_tag: str | None) -> None:
        # The server verified the sha256 header before answering 200; the ETag is a second look.
        self._check_md5_etag(key, data, e_tag)


class GCSTarget(Target):
    """Google Cloud Storage (XML API): the ETag of a single PUT is the object's MD5, compared with
    the bytes sent; an object whose ETag is not an MD5 is read back. Credentials:
    GOOGLE_APPLICATION_CREDENTIALS / GOOGLE_SERVICE_ACCOUNT*, the metadata server, or
    `bucket.credentials_file` as a service-account JSON."""

    provider = "gcs"
    checksum = "MD5 ETag (read back when opaque) + sha256 metadata"

    def _open_store(self, client: ClientConfig, retry: RetryConfig) -> Any:
        from obstore.store import GCSStore

        options: dict[str, Any] = {}
        if self.config.credentials_file is not None:
            self._credentials_file_text()  # a clear error for a missing file
            options["service_account"] = str(self.config.credentials_file)
        if self.config.endpoint:
            options["base_url"] = self.config.endpoint
        return GCSStore(self.where.bucket, prefix=self.where.prefix or None, client_options=client,
                        retry_config=retry, **options)

    async def _verify(self, key: str, data: bytes, digest: str, e_tag: str | None) -> None:
        if not self._check_md5_etag(key, data, e_tag):
            await super()._verify(key, data, digest, e_tag)


class AzureTarget(Target):
    """Azure Blob: its ETag is opaque, so every object is read back and its sha256 compared.
    Credentials: AZURE_STORAGE_* variables, managed identity, or `bucket.credentials_file`
    holding the storage account key (e.g. a systemd credential); account from `bucket.account`,
    the https URL's host, or AZURE_STORAGE_ACCOUNT_NAME."""

    provider = "azure"
    checksum = "read back and sha256 compared + sha256 metadata"

    def _open_store(self, client: ClientConfig, retry: RetryConfig) -> Any:
        from obstore.store import AzureStore

        options: dict[str, Any] = {}
        account = self.config.account or self.where.account
        if account:
            options["account_name"] = account
        text = self._credentials_file_text()
        if text is not None:
            key = text.strip()
            try:
                base64.b64decode(key, validate=True)
            except ValueError:
                raise ConfigError(f"bucket.credentials_file: expected a base64 storage account key in "
                                  f"{self.config.credentials_file}") from None
            options["access_key"] = key
        if self.config.endpoint:
            options["endpoint"] = self.config.endpoint
        return AzureStore(self.where.bucket, prefix=self.where.prefix or None, client_options=client,
                          retry_config=retry, **options)


PROVIDER_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "az": "azure", "azure": "azure"}
PROVIDERS: dict[str, type[Target]] = {"s3": S3Target, "gcs": GCSTarget, "azure": AzureTarget}


def open_target(url: str, bucket: Any, *, max_retries: int = 1) -> Target:
    """The target for a bucket URL; ConfigError for a bad URL or credentials file."""
    from obstore.exceptions import BaseError

    try:
        provider = parse_url(url).provider
        return PROVIDERS[provider](url, bucket, max_retries=max_retries)
    except (ValueError, BaseError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{url}: cannot open the bucket: {first_line}") from None
