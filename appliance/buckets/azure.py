"""Azure Blob containers (az://, https://<account>.blob.core.windows.net)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .target import Target

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig


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
