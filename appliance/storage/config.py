"""The [storage] section: which back end keeps images and records, where, and how."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..settings import one_of
from . import BACKENDS


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
