"""A model swap under load: throughput and p99 during the swap vs steady state, peak RSS, SIGHUP to new version.

    .venv/bin/python -m bench.swap --model models/demo/1     # a version directory (python -m convert demo)

The model's version directory is copied as version 1 of a scratch model
directory, `appliance serve` serves it, and `--clients` threads post a real
JPEG to /check-image back to back. After `--steady-s` seconds of steady state
the same version is dropped in as version 2 and the server gets SIGHUP; the
swap window runs from the signal until /v1/info names version 2, plus one
second of the old version draining. RSS is sampled every 20 ms throughout. On
demand only: numbers depend on the machine and are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.modeldir import MANIFEST, MANIFEST_DIGEST, SIGNATURE

from . import procs
from .images import MULTIPART_TYPE, multipart_body

HEADERS = {"X-User-Id": "bench", "Content-Type": MULTIPART_TYPE}
DRAIN_S = 1.0  # kept in the swap window after the new version serves: the old one's last requests


@dataclass
class Answers:
    """(finish time, seconds, version) of each answer, and every failure."""

    done: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _jpeg() -> bytes:
    rng = np.random.default_rng(7)
    pixels = (rng.normal(150, 40, size=(450, 600, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _client(server: procs.Server, body: bytes, answers: Answers, stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        status, raw = server.post("/check-image", body, HEADERS)
        if status != 200:
            answers.failures.append(f"{status}: {raw[:200]!r}")
            continue
        answers.done.append((time.monotonic(), time.monotonic() - started, json.loads(raw)["model"]["version"]))


def _window(answers: Answers, start: float, end: float) -> dict[str, Any]:
    """Throughput and latency of the answers that finished within [start, end)."""
    seconds = sorted(s for t, s, _ in answers.done if start <= t < end)
    if not seconds:
        return {"answers": 0, "per_s": 0.0, "p50_ms": None, "p99_ms": None}
    return {"answers": len(seconds), "per_s": round(len(seconds) / (end - start), 1),
            "p50_ms": round(statistics.median(seconds) * 1000, 1),
            "p99_ms": round(seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))] * 1000, 1)}


def _as_version(directory: Path, version: int) -> None:
    """Renumber a copied version directory: its manifest, and the manifest's digest (format 2) to match."""
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["version"] = version
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    path.write_bytes(data)
    if (directory / MANIFEST_DIGEST).exists():
        (directory / MANIFEST_DIGEST).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")
    (directory / SIGNATURE).unlink(missing_ok=True)  # no longer the signed bytes; serve without model.trusted_keys


def _version(server: procs.Server) -> str:
    status, raw = server.get("/v1/info")
    return str(json.loads(raw)["model"]["version"]) if status == 200 else ""


def run(model: Path, work: Path, *, clients: int, steady_s: float, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One swap under load; the figures as a dict."""
    root = work / "model"
    shutil.copytree(model, root / "1")
    server = procs.start_appliance("swap", root, work, overrides)
    answers, stop = Answers(), threading.Event()
    body = multipart_body(_jpeg(), "lesion.jpg")
    rss: list[tuple[float, float]] = []
    threads = [threading.Thread(target=_client, args=(server, body, answers, stop), daemon=True) for _ in range(clients)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2.0)  # past the first requests' warm-up
        steady_start = time.monotonic()
        while time.monotonic() < steady_start + steady_s:
            rss.append((time.monotonic(), server.memory_mb()[0]))
            time.sleep(0.02)
        steady_end = time.monotonic()
        steady_rss = max(r for _, r in rss)
        staging = root / ".staging"
        shutil.copytree(model, staging)
        _as_version(staging, 2)
        staging.rename(root / "2")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGHUP)
        swap_rss: list[float] = []
        while _version(server) != "2":
            swap_rss.append(server.memory_mb()[0])
            if time.monotonic() - signalled > 300:
                raise procs.ServerFailed(f"version 2 not served 300 s after SIGHUP:\n{server.log_tail()}")
            time.sleep(0.02)
        serving_s = time.monotonic() - signalled
        drain_end = time.monotonic() + DRAIN_S
        while time.monotonic() < drain_end:
            swap_rss.append(server.memory_mb()[0])
            time.sleep(0.02)
        swap_end = time.monotonic()
        time.sleep(2.0)
        after_rss = server.memory_mb()[0]
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        server.stop()
    steady, swap = _window(answers, steady_start, steady_end), _window(answers, signalled, swap_end)
    versions = [v for _, _, v in answers.done]
    return {
        "clients": clients, "steady": steady, "swap": swap, "sighup_to_serving_s": round(serving_s, 2),
        "throughput_ratio": round(swap["per_s"] / steady["per_s"], 2) if steady["per_s"] else None,
        "p99_ratio": round(swap["p99_ms"] / steady["p99_ms"], 2) if steady["p99_ms"] and swap["p99_ms"] else None,
        "rss_mb": {"steady_peak": steady_rss, "swap_peak": max(swap_rss), "after": after_rss,
                   "swap_peak_ratio": round(max(swap_rss) / steady_rss, 2)},
        "failures": len(answers.failures), "answers_by_version": {v: versions.count(v) for v in sorted(set(versions))},
    }


def section(bench: Any) -> dict[str, Any]:
    """The `swap` section of `python -m bench` (a `suite.Bench`): one swap under load on the bench's model."""
    bench.say("model swap under load: steady state, then SIGHUP with a new version")
    return run(bench.model_dir, bench.work / "swap", clients=4, steady_s=3.0 if bench.quick else 10.0, overrides={})


def report_section(result: dict[str, Any]) -> str:
    """The report's markdown for a `run` result ("" when the section did not run)."""
    if not result:
        return ""
    steady, swap, rss = result["steady"], result["swap"], result["rss_mb"]
    return ("## Model swap under load (issue 14)\n\n"
            f"{result['clients']} clients posting a JPEG back to back; SIGHUP with a new version dropped in. "
            f"Failed requests: **{result['failures']}**; answers by version {result['answers_by_version']}.\n\n"
            "| | steady | during the swap | ratio |\n|---|---|---|---|\n"
            f"| images/s | {steady['per_s']} | {swap['per_s']} | {result['throughput_ratio']} |\n"
            f"| p99 ms | {steady['p99_ms']} | {swap['p99_ms']} | {result['p99_ratio']} |\n"
            f"| RSS MB (peak) | {rss['steady_peak']} | {rss['swap_peak']} | {rss['swap_peak_ratio']} |\n\n"
            f"SIGHUP to the new version serving: {result['sighup_to_serving_s']} s; RSS once the old version "
            f"closed: {rss['after']} MB.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=procs.ROOT / "models" / "demo" / "1",
                        help="a model version directory (default: models/demo/1)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=10.0)
    parser.add_argument("--backend", default="openvino", help="runtime.backend")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as work:
        result = run(args.model, Path(work), clients=args.clients, steady_s=args.steady_s,
                     overrides={"runtime": {"backend": args.backend}})
    print(json.dumps(result, indent=2))
    print(f"during the swap: {result['throughput_ratio']}x steady throughput, {result['p99_ratio']}x steady p99; "
          f"SIGHUP to v2 serving {result['sighup_to_serving_s']} s; peak RSS {result['rss_mb']['swap_peak']} MB "
          f"({result['rss_mb']['swap_peak_ratio']}x steady), {result['rss_mb']['after']} MB after; "
          f"{result['failures']} failed requests")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
