"""Amazon S3 and S3-compatible buckets (s3://, https://…amazonaws.com)."""

from __future__ import annotations

import configparser
import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .target import Target

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig


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
