"""The bucket target every provider shares: upload with a sha256, check it arrived, read and list.

A provider's module (s3.py, gcs.py, azure.py) opens its obstore store from
the `BucketConfig` and says how an upload is checked; obstore is imported only
when a target is opened. Credentials come from the provider's usual sources,
which obstore reads itself (environment variables, instance / workload
identity), or from `bucket.credentials_file`; never from config.toml.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ApplianceError, ConfigError
from .config import BucketConfig
from .urls import parse_url

if TYPE_CHECKING:
    # obstore declares these TypedDicts only in its stubs: not importable at run time.
    from obstore.store import ClientConfig, RetryConfig

_MD5_HEX = re.compile(r"[0-9a-f]{32}")


class IntegrityError(ApplianceError):
    """An uploaded object does not match the bytes sent (checksum mismatch)."""


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


class Target:
    """One bucket prefix reached through obstore; `put` uploads and checks, raising on any failure."""

    provider = ""

    def __init__(self, url: str, bucket: BucketConfig, *, max_retries: int = 1) -> None:
        self.url = url
        self.where = parse_url(url)
        self.config = bucket
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

    def read_sync(self, key: str) -> tuple[bytes, Mapping[str, str]] | None:
        """The object's bytes and attributes (its sha256 metadata among them), or None when there is none; blocking."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = obstore.get(self.store, key)
            return bytes(result.bytes()), {k: str(v) for k, v in result.attributes.items()}
        except (NotFoundError, FileNotFoundError):  # obstore raises the built-in one for a 404
            return None

    def put_sync(self, key: str, data: bytes, content_type: str) -> None:
        """`put`, blocking, for a caller in a worker thread (never on an event loop)."""
        # A private loop runs the same upload and check as `put`, each provider's `_verify` included.
        asyncio.run(self.put(key, data, content_type))

    def delete_sync(self, key: str) -> None:
        """Remove the object at `key`; none there is fine (S3, GCS and Azure all answer so); blocking."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            obstore.delete(self.store, key)
        except (NotFoundError, FileNotFoundError):
            pass

    def list_sync(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (relative to the target's prefix), blocking."""
        import obstore

        return [meta["path"] for batch in obstore.list(self.store, prefix or None) for meta in batch]

    def describe(self) -> dict[str, Any]:
        """Provider, bucket and prefix; never credentials."""
        return {"provider": self.provider, "bucket": self.where.bucket, "prefix": self.where.prefix,
                "checksum": self.checksum}

    checksum = "sha256 metadata, read back"
