"""Google Cloud Storage buckets (gs://, https://storage.googleapis.com)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .target import Target

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig


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
