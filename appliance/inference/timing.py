"""`auto` by measurement: time each served path that met its bar on this machine, once per version, and cache it.

What convert measured (`ms_per_image` in model.json) was measured on the
machine that converted, often not the box that serves; a box may be faster
with another artifact or decode mode. With `model.measure_paths`, the first
start of a version times every path the settings allow that passed its bar:
each artifact is loaded in turn (one in memory at a time), warmed up, and the
golden images are decoded with each decode mode and inferred one by one, as a
lone clinic request would be. The medians are written beside the compiled-model
cache (`runtime.<name>.cache_dir` where the back end has one, else
`model.cache_dir`), keyed by the manifest's sha256, the runtime, its precision
and device, so later starts and reloads read them instead of measuring again.
Only paths that passed their bar are timed, so a precision (bf16) is served
only where convert measured its parity for that artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import imaging
from ..modeldir import MANIFEST, DecodeMode, Manifest, ServedPath
from .paths import Choice
from .runtimes import Runtime

log = logging.getLogger(__name__)

ROUNDS = 3  # passes over the golden images per path; the median per image is kept


def timings_file(cache_dir: Path, manifest: Manifest, runtime: str, precision: str, device: str) -> Path:
    """The cache file for this version on this runtime, precision and device."""
    digest = hashlib.sha256((manifest.directory / MANIFEST).read_bytes()).hexdigest()
    key = hashlib.sha256(f"{digest} {runtime} {precision} {device}".encode()).hexdigest()[:16]
    return cache_dir / f"path-timings-{manifest.name}-{manifest.version}-{key}.json"


def measured_choice(manifest: Manifest, candidates: list[ServedPath], create: Callable[[], Runtime],
                    cache: Path) -> Choice:
    """The fastest of `candidates` (paths that passed) on this machine, measured now or read from `cache`."""
    timings = _read(cache, candidates)
    if timings is None:
        timings = measure(manifest, candidates, create)
        _write(cache, timings)
        log.info("timed %d served path(s) of %s v%s on this machine: %s (cached in %s)", len(timings), manifest.name,
                 manifest.version, ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(timings.items(), key=lambda kv: kv[1])),
                 cache)
    best = min(candidates, key=lambda p: (timings[p.key], p.key))
    return Choice(best, f"fastest measured on this machine of {len(candidates)} path(s) that met the bar: "
                        f"{timings[best.key]:.1f} ms/img decode + inference (timings in {cache})")


def measure(manifest: Manifest, candidates: list[ServedPath], create: Callable[[], Runtime]) -> dict[str, float]:
    """Median ms per image (decode + batch-1 inference) of each candidate, one artifact loaded at a time."""
    images = [(manifest.directory / image.file).read_bytes() for image in manifest.golden]
    timings: dict[str, float] = {}
    for artifact in sorted({p.artifact for p in candidates}):
        runtime = create()
        try:
            runtime.load(manifest.directory / manifest.artifacts[artifact].file)
            for path in (p for p in candidates if p.artifact == artifact):
                _classify(runtime, manifest, images[0], path.decode)  # warm-up: a shape's first run pays for kernels
                seconds = []
                for _ in range(ROUNDS):
                    for data in images:
                        started = time.perf_counter()
                        _classify(runtime, manifest, data, path.decode)
                        seconds.append(time.perf_counter() - started)
                timings[path.key] = round(statistics.median(seconds) * 1000.0, 2)
        finally:
            runtime.close()
    return timings


def _classify(runtime: Runtime, manifest: Manifest, data: bytes, mode: DecodeMode) -> None:
    """What a lone request costs: decode in `mode`, infer a batch of one."""
    decoded = imaging.decode(data, manifest.preprocessing, max_pixels=1 << 40, mode=mode)
    runtime.infer(decoded.tensor[np.newaxis])


def _read(cache: Path, candidates: list[ServedPath]) -> dict[str, float] | None:
    try:
        timings = json.loads(cache.read_text(encoding="utf-8"))["ms_per_image"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(timings, dict) or not all(isinstance(timings.get(p.key), (int, float)) for p in candidates):
        return None  # another set of paths was timed (settings changed): time this one
    return {str(k): float(v) for k, v in timings.items()}


def _write(cache: Path, timings: dict[str, float]) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"measured_at": time.time(), "ms_per_image": timings}), encoding="utf-8")
        temporary.replace(cache)
    except OSError as exc:  # serving does not depend on the cache: the next start measures again
        log.warning("cannot cache the path timings in %s: %s", cache, exc)
