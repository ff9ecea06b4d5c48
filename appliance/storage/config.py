"""The [storage] section: which back end keeps images and records, where, and how."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from . import BACKENDS


@dataclass(frozen=True)
class StorageConfig:
    """Where images and records are kept."""

    backend: str = "sqlite"
    root: Path = Path("data")
    case_id_start: int = 10000
    # Encryption at rest (appliance/storage/crypto.py); the key itself never sits in config.
    encrypt: bool = False
    key_file: Path | None = None


def check_storage(storage: StorageConfig) -> None:
    """Refuse a back end that is not registered in BACKENDS, naming the key."""
    if storage.backend not in BACKENDS:
        raise ConfigError(f"storage.backend: expected one of {', '.join(BACKENDS)}; got {storage.backend!r}")
