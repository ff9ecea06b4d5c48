"""Load generation: wrk with bench/post.lua, or a small asyncio client when wrk is not installed.

Both are closed-loop: `concurrency` connections, each sending its next
request as soon as the previous answer arrives, for `duration_s`. Both print
the same JSON summary, so the report does not care which ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class LoadResult:
    """One load run: answers per second, latency percentiles, errors."""

    generator: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int  # non-2xx answers, socket errors and timeouts
    rps: float  # successful answers per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    error_kinds: dict[str, int]
    statuses: dict[str, int]  # answers by HTTP status

    def as_dict(self) -> dict:
        return asdict(self)


def generator_name() -> str:
    """"wrk" when installed, else "asyncio" (bench/loadgen.py in its own process)."""
    return "wrk" if shutil.which("wrk") else "asyncio"


def run_load(url: str, body_path: Path, content_type: str, headers: dict[str, str], *, concurrency: int,
             duration_s: int, timeout_s: int = 60) -> LoadResult:
    """Drive `url` with POSTs of the body for `duration_s` seconds at `concurrency`."""
    header_args = [f"{k}: {v}" for k, v in headers.items()]
    name = generator_name()
    if name == "wrk":
        # One wrk thread: its event loop keeps 16 connections busy on a few % of one core.
        argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", f"--timeout={timeout_s}s",
                "-s", str(HERE / "post.lua"), url, "--", str(body_path), content_type, *header_args]
    else:
        argv = [sys.executable, "-m", "bench.loadgen", url, "--body", str(body_path), "--content-type", content_type,
                "--concurrency", str(concurrency), "--duration", str(duration_s), "--timeout", str(timeout_s)]
        argv += [item for h in header_args for item in ("--header", h)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=HERE.parent, timeout=duration_s + timeout_s + 30)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    raw = json.loads(lines[-1])
    kinds = {k: int(raw[k]) for k in ("connect", "read", "write", "status", "timeout") if raw.get(k)}
    duration = raw["duration_us"] / 1e6
    errors = sum(kinds.values())
    ok = max(0, raw["requests"] - raw["status"])
    return LoadResult(name, concurrency, round(duration, 2), raw["requests"], errors, round(ok / duration, 2),
                      raw["p50_us"] / 1000, raw["p90_us"] / 1000, raw["p99_us"] / 1000, raw["max_us"] / 1000, kinds,
                      raw.get("statuses", {}))
