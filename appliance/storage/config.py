"""The [storage] section: which back end keeps images and records, where, and how; and where its DSN comes from."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..settings import positive, seconds, one_of
from . import BACKENDS

DATABASE_URL_CREDENTIAL = "database-url"
_PASSWORD_WORD = re.compile(r"(^|\s)password\s*=", re.IGNORECASE)


@dataclass(frozen=True)
class StorageConfig:
    """Where images and records are kept."""

    backend: str = one_of("sqlite", BACKENDS.keys)
    root: Path = Path("data")
    case_id_start: int = 10000
    # Encryption at rest (appliance/storage/crypto.py); the key itself never sits in config.
    encrypt: bool = False
    key_file: Path | None = None
    # Where image bytes go: "local" files under root, or "bucket" objects at images_url
    # (storage/images.py; only for a back end keeping records apart, such as postgres).
    images: Literal["local", "bucket"] = "local"
    images_url: str = ""
    # backend = "postgres" (storage/postgres.py). The DSN: DATABASE_URL, else database_url (no password
    # here), else the file database_url_file, else the systemd credential database-url.
    database_url: str = ""
    database_url_file: Path | None = None
    statement_timeout_s: float = seconds(5.0)
    pool_size: int = positive(4)


def has_password(dsn: str) -> bool:
    """True when a DSN (URL or key=value form) carries a password."""
    if "://" in dsn:
        try:
            return urlsplit(dsn).password is not None or "password=" in dsn.partition("?")[2].lower()
        except ValueError:
            return False
    return bool(_PASSWORD_WORD.search(dsn))


def check_storage(storage: StorageConfig) -> None:
    """A password never sits in config.toml: refuse one in storage.database_url."""
    if storage.database_url and has_password(storage.database_url):
        raise ConfigError(
            "storage.database_url: holds a password; put the password in DATABASE_URL, storage.database_url_file "
            f"or the systemd credential {DATABASE_URL_CREDENTIAL}, never in config.toml"
        )


def resolve_database_url(
    configured: str = "", url_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The DSN, first found: DATABASE_URL, storage.database_url, storage.database_url_file, the credential.

    ConfigError naming every source when none is set, or when a file named cannot be read.
    """
    environ = os.environ if environ is None else environ
    if environ.get("DATABASE_URL", "").strip():
        return environ["DATABASE_URL"].strip()
    if configured.strip():
        return configured.strip()
    credentials = environ.get("CREDENTIALS_DIRECTORY", "").strip()
    for path, source in (
        (url_file, "storage.database_url_file"),
        (Path(credentials) / DATABASE_URL_CREDENTIAL if credentials else None, f"credential {DATABASE_URL_CREDENTIAL}"),
    ):
        if path is None or (source.startswith("credential") and not path.is_file()):
            continue
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"{source}: cannot read {path}: {reason}") from None
        if not text:
            raise ConfigError(f"{source}: {path} is empty; expected a PostgreSQL DSN")
        return text
    raise ConfigError(
        'storage.backend = "postgres" needs a DSN: set DATABASE_URL, storage.database_url, '
        f"storage.database_url_file or the systemd credential {DATABASE_URL_CREDENTIAL}"
    )
