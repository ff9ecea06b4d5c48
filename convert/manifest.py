"""Writing the model directory's `model.json` (and its sha256 beside it) and `source.json`, with sha256 of every file."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.inference.model import MANIFEST, MANIFEST_DIGEST

from .checkpoint import sha256_file
from .images import CROP, INPUT_NAME, OUTPUT_NAME, preprocessing_table

# 2: served_paths, verification, golden sha256 and model.json.sha256 (the appliance reads 1 and 2).
FORMAT = 2


def file_hashes(version_dir: Path, files: list[Path]) -> dict[str, str]:
    """Map each file (relative to the version directory, POSIX separators) to its sha256."""
    return {path.relative_to(version_dir).as_posix(): sha256_file(path) for path in files}


def artifact_entry(version_dir: Path, fmt: str, precision: str, files: list[Path], **fields: Any) -> dict:
    """One `artifacts.*` table: the main file first in `files`, every file hashed."""
    hashes = file_hashes(version_dir, files)
    main = files[0].relative_to(version_dir).as_posix()
    return {"format": fmt, "precision": precision, "file": main, "sha256": hashes[main], "files": hashes, **fields}


def build_manifest(
    *, name: str, version: int, demo: bool, labels: list[str], source: dict, artifacts: dict, golden: list[dict],
    served_paths: dict, verification: dict,
) -> dict:
    """The whole `model.json` document, in the order models/README.md shows it."""
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "demo": demo,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": list(labels),
        "input": {"name": INPUT_NAME, "shape": [-1, 3, CROP, CROP], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": [-1, len(labels)], "dtype": "float32"},
        "preprocessing": preprocessing_table(),
        "source": source,
        "artifacts": artifacts,
        "served_paths": served_paths,
        "verification": verification,
        "golden": golden,
    }


def write_manifest(version_dir: Path, document: dict) -> None:
    """Write model.json and, beside it, its sha256 (which the appliance checks before reading it)."""
    write_json(version_dir / MANIFEST, document)
    digest = hashlib.sha256((version_dir / MANIFEST).read_bytes()).hexdigest()
    (version_dir / MANIFEST_DIGEST).write_text(f"{digest}  {MANIFEST}\n", encoding="ascii")


def write_json(path: Path, document: dict) -> None:
    """Write JSON with a trailing newline, keys in insertion order."""
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
