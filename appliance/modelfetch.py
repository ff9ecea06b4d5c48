"""Models from a bucket: `model.url` (MODEL_URL) fetched into `model.cache_dir` at start.

The URL names a model version directory (holding model.json) or a model
directory whose highest numbered version is taken. Every artifact file the
manifest lists is downloaded and its sha256 checked against the manifest
before the copy is moved into place; one that differs stops start-up with one
line naming the file. Layout of the cache::

    <cache_dir>/<sha256(url)[:16]>/<version>/...   the verified copy
    <cache_dir>/<sha256(url)[:16]>/verified.json    which version was last verified

When the bucket cannot be reached, the last verified copy is used (with a
warning); with none, start-up stops. A fleet then updates one bucket path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ConfigError, ModelError
from .modeldir import MANIFEST, MANIFEST_DIGEST, digest_matches

log = logging.getLogger(__name__)

VERIFIED = "verified.json"


class ModelFetchRefused(ModelError):
    """The bucket answered, but with a model this appliance must not load (tampered, malformed)."""


def model_source(model: Any, bucket: Any) -> Path:
    """The model directory to load: `model.path`, or `model.url` fetched and verified (blocking)."""
    if not model.url:
        return Path(model.path)
    return fetch_model(model.url, Path(model.cache_dir), bucket)


def _cache_for(url: str, cache_dir: Path) -> Path:
    return cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]


def cached_model_dir(url: str, cache_dir: Path) -> Path | None:
    """The last verified copy of the model at `url`, without touching the network; None if none."""
    return _last_verified(_cache_for(url, cache_dir))


def fetch_model(url: str, cache_dir: Path, bucket: Any) -> Path:
    """Fetch the model at `url` into the cache and return its version directory."""
    from .buckets import open_target

    cache = _cache_for(url, cache_dir)
    target = open_target(url, bucket, max_retries=1)
    try:
        return _download(target, url, cache)
    except (ModelFetchRefused, ConfigError):
        raise
    except Exception as exc:  # unreachable bucket, expired credentials, ...: fall back
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        verified = _last_verified(cache)
        if verified is None:
            raise ModelError(f"model.url: cannot fetch {url} ({reason}) and there is no verified copy in {cache}") from None
        log.warning("model.url: cannot fetch %s (%s); using the last verified copy %s", url, reason, verified)
        return verified


def _last_verified(cache: Path) -> Path | None:
    try:
        version = json.loads((cache / VERIFIED).read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = cache / str(version)
    return path if (path / MANIFEST).is_file() else None


def _download(target: Any, url: str, cache: Path) -> Path:
    prefix = ""
    try:
        manifest_bytes = target.get_sync(MANIFEST)
    except FileNotFoundError:  # obstore's "no such object"
        prefix = _highest_version_prefix(target, url)
        manifest_bytes = target.get_sync(prefix + MANIFEST)
    try:
        manifest = json.loads(manifest_bytes)
        version = int(manifest["version"])
        expected = _expected_files(manifest)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFetchRefused(f"model.url: {url}/{prefix}{MANIFEST} is not a valid manifest ({e})") from None
    digest_bytes = None
    if manifest.get("format", 1) >= 2:
        digest_bytes = target.get_sync(prefix + MANIFEST_DIGEST)
        if not digest_matches(manifest_bytes, digest_bytes):
            raise ModelFetchRefused(f"model.url: {url}/{prefix}{MANIFEST} does not match {MANIFEST_DIGEST} beside it; "
                                    f"refusing this model")
    current = _last_verified(cache)
    if current is not None and (current / MANIFEST).read_bytes() == manifest_bytes and _intact(current, expected):
        return current
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".staging-{os.getpid()}-{time.monotonic_ns()}"
    try:
        for rel, digest in expected.items():
            data = target.get_sync(prefix + rel)
            if digest is not None and hashlib.sha256(data).hexdigest() != digest:
                raise ModelFetchRefused(
                    f"model.url: {url}/{prefix}{rel} does not match its manifest sha256 "
                    f"(expected {digest}, got {hashlib.sha256(data).hexdigest()}); refusing this model"
                )
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (staging / MANIFEST).write_bytes(manifest_bytes)
        if digest_bytes is not None:
            (staging / MANIFEST_DIGEST).write_bytes(digest_bytes)
        _fsync_tree(staging)
        final = cache / str(version)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    marker = cache / f".{VERIFIED}.tmp"
    marker.write_text(json.dumps({"version": version, "url": url, "verified_at": time.time()}), encoding="utf-8")
    os.replace(marker, cache / VERIFIED)
    log.info("model.url: fetched and verified %s version %d into %s", url, version, final)
    return final


def _highest_version_prefix(target: Any, url: str) -> str:
    versions = []
    for key in target.list_sync():
        parts = PurePosixPath(key).parts
        # Keys come back with the target's prefix; the version is the part before model.json.
        if len(parts) >= 2 and parts[-1] == MANIFEST and parts[-2].isdigit():
            versions.append((int(parts[-2]), parts[-2]))
    if not versions:
        raise ModelFetchRefused(f"model.url: no {MANIFEST} under {url}, nor in a numbered version directory")
    return f"{max(versions)[1]}/"


def _expected_files(manifest: dict[str, Any]) -> dict[str, str | None]:
    """Every file the manifest names, with its sha256 where it gives one (artifacts do; golden images from format 2 on)."""
    files: dict[str, str | None] = {}
    for artifact in manifest["artifacts"].values():
        for rel, digest in artifact.get("files", {artifact["file"]: artifact["sha256"]}).items():
            files[_safe(rel)] = str(digest)
    for golden in manifest.get("golden", []):
        files.setdefault(_safe(golden["file"]), golden.get("sha256"))
    return files


def _safe(rel: str) -> str:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"unsafe file name in manifest: {rel!r}")
    return str(path)


def _intact(version_dir: Path, expected: dict[str, str | None]) -> bool:
    for rel, digest in expected.items():
        path = version_dir / rel
        if not path.is_file():
            return False
        if digest is not None and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return False
    return True


def _fsync_tree(root: Path) -> None:
    """Make the fetched files durable before they replace the previous copy."""
    for path in sorted(root.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
