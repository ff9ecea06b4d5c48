"""Models from a bucket: `model.url` (MODEL_URL) fetched into `model.cache_dir` at start.

The URL names a model version directory (holding model.json) or a model
directory whose highest numbered version is taken. model.json is checked
against model.json.sha256 and, with `model.trusted_keys`, its signature
model.json.sig; every artifact and golden file the manifest lists is downloaded
and its sha256 checked against the manifest before the copy is moved into
place; one that differs stops start-up with one line naming the file. Layout
of the cache::

    <cache_dir>/<sha256(url)[:16]>/<version>-<n>/...   the verified copy
    <cache_dir>/<sha256(url)[:16]>/verified.json        which copy was last verified

A new copy goes into a directory of its own, then verified.json is replaced
atomically to point at it, and only then are older copies removed: a crash at
any point leaves the previous or the new verified copy, never neither.

When the bucket cannot be reached, the last verified copy is used (with a
warning); with none, start-up stops. A fleet then updates one bucket path.

On a running box (a reload, or the `model.poll_interval_s` poll) a new version
is fetched with `mark=False`: its files are checked as above, but verified.json
moves to it (`mark_verified`) only once the server's self-check has passed, so
a version refused on this box is never the one a restart would load. A refused
copy stays in the cache, unmarked, and is not downloaded again while the
bucket holds the same manifest.
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
from .modeldir import MANIFEST, MANIFEST_DIGEST, SIGNATURE, digest_matches, load_trusted_keys, signature_ok

log = logging.getLogger(__name__)

VERIFIED = "verified.json"


class ModelFetchRefused(ModelError):
    """The bucket answered, but with a model this appliance must not load (tampered, malformed)."""


def model_source(model: Any, bucket: Any) -> Path:
    """The model directory to load: `model.path`, or `model.url` fetched and verified (blocking)."""
    if not model.url:
        return Path(model.path)
    return fetch_model(model.url, Path(model.cache_dir), bucket, tuple(model.trusted_keys))


def _cache_for(url: str, cache_dir: Path) -> Path:
    return cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]


def cached_model_dir(url: str, cache_dir: Path) -> Path | None:
    """The last verified copy of the model at `url`, without touching the network; None if none."""
    return _last_verified(_cache_for(url, cache_dir))


def fetch_model(url: str, cache_dir: Path, bucket: Any, trusted_keys: tuple[Path, ...] = (), *,
                mark: bool = True) -> Path:
    """Fetch the model at `url` into the cache and return its version directory.

    With `trusted_keys`, a model whose model.json.sig is missing or signed by none of them is refused.
    With `mark` False a new copy is not yet the verified one: `mark_verified` makes it so.
    """
    from .buckets import open_target

    cache = _cache_for(url, cache_dir)
    keys = load_trusted_keys(trusted_keys)  # a bad key file is a config error, before any download
    target = open_target(url, bucket, max_retries=1)
    try:
        return _download(target, url, cache, keys, mark)
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
        marker = json.loads((cache / VERIFIED).read_text(encoding="utf-8"))
        # "dir" since copies got directories of their own; a marker written before names only the version.
        name = str(marker.get("dir", marker["version"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    path = cache / name
    return path if name and "/" not in name and (path / MANIFEST).is_file() else None


def _download(target: Any, url: str, cache: Path, keys: list[tuple[Path, Any]], mark: bool) -> Path:
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
    signature = _signature(target, prefix)
    if keys and signature is None:
        raise ModelFetchRefused(f"model.url: {url}/{prefix}{SIGNATURE} is missing and model.trusted_keys is set; "
                                "refusing this model")
    if keys and not signature_ok(manifest_bytes, signature or b"", keys):
        raise ModelFetchRefused(f"model.url: {url}/{prefix}{SIGNATURE} is not a valid signature of {MANIFEST} by any "
                                f"of model.trusted_keys ({', '.join(str(p) for p, _ in keys)}); refusing this model")
    current = _last_verified(cache)
    if (current is not None and (current / MANIFEST).read_bytes() == manifest_bytes
            and _file_bytes(current / SIGNATURE) == signature and _intact(current, expected)):
        return current
    if not mark:  # a copy fetched before and not (yet) marked: a refused version is not downloaded again
        for copy in sorted(cache.iterdir()) if cache.is_dir() else []:
            if (copy.is_dir() and not copy.name.startswith(".") and _file_bytes(copy / MANIFEST) == manifest_bytes
                    and _file_bytes(copy / SIGNATURE) == signature and _intact(copy, expected)):
                return copy
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
        if signature is not None:
            (staging / SIGNATURE).write_bytes(signature)
        _fsync_tree(staging)
        # Never over the verified copy: a name of its own, then the marker moves (atomically) to it.
        final = _fresh_dir(cache, version)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("model.url: fetched and verified %s version %d into %s", url, version, final)
    if mark:
        _mark(cache, final, url, version)
    return final


def mark_verified(url: str, cache_dir: Path, directory: Path) -> None:
    """Make `directory` (a copy `fetch_model(mark=False)` returned) the verified copy, and drop the others."""
    cache = _cache_for(url, cache_dir)
    if _last_verified(cache) == directory:
        return
    version = int(json.loads((directory / MANIFEST).read_bytes())["version"])
    _mark(cache, directory, url, version)


def _mark(cache: Path, final: Path, url: str, version: int) -> None:
    marker = cache / f".{VERIFIED}.tmp"
    marker.write_text(json.dumps({"version": version, "dir": final.name, "url": url, "verified_at": time.time()}),
                      encoding="utf-8")
    _fsync_file(marker)
    os.replace(marker, cache / VERIFIED)
    _fsync_file(cache)
    for old in cache.iterdir():  # older copies, now that nothing points at them
        if old != final and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


def _fresh_dir(cache: Path, version: int) -> Path:
    """A copy directory for `version` that does not exist yet: <version>-<n>."""
    n = 1
    while (cache / f"{version}-{n}").exists():
        n += 1
    return cache / f"{version}-{n}"


def _signature(target: Any, prefix: str) -> bytes | None:
    """model.json.sig beside the manifest in the bucket, or None when there is none."""
    try:
        return bytes(target.get_sync(prefix + SIGNATURE))
    except FileNotFoundError:
        return None


def _file_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """Every file the manifest names, with its sha256 where it gives one (artifacts do; golden images from format 2 on;
    verification photos always)."""
    files: dict[str, str | None] = {}
    for artifact in manifest["artifacts"].values():
        for rel, digest in artifact.get("files", {artifact["file"]: artifact["sha256"]}).items():
            files[_safe(rel)] = str(digest)
    verification = manifest.get("verification", {})
    for image in [*manifest.get("golden", []), *(verification.get("set", []) if isinstance(verification, dict) else [])]:
        files.setdefault(_safe(image["file"]), image.get("sha256"))
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
        _fsync_file(path)
    _fsync_file(root)
