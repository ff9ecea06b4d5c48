"""Where a request's time goes: py-spy samples of the appliance under load, summed per thread and function.

py-spy samples every thread's Python stack `rate` times a second without
stopping the process (`--nonblocking`); idle threads are not sampled, so a
thread's sample count over `rate x seconds` is how busy it was. Native work
(ONNX Runtime's kernels, libjpeg, SQLite) shows as the Python frame that
called it. The raw stacks are kept beside the report (speedscope and
flamegraph.pl read them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_THREAD = re.compile(r"^thread \(\d+\): ([^;]+?)(?:_\d+)?;")
_FRAME = re.compile(r"^(.*) \((.*?):\d+\)$")


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, out: Path, rate: int = 50) -> None:
    """Sample `pid` for `seconds` into `out` (collapsed stacks, one per line with its count)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install -e '.[bench]')")
    subprocess.run([exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
                    "--format", "raw", "--threads", "--nonblocking", "-o", str(out)],
                   check=True, capture_output=True, timeout=seconds + 60)


def summarise(raw: Path, seconds: float, rate: int = 50, top: int = 6) -> dict[str, Any]:
    """Per thread group (event loop, decode, inference, store): % busy and the appliance functions it was in."""
    threads: Counter[str] = Counter()
    functions: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        match = _THREAD.match(stack)
        if not match or not count_text.isdigit():
            continue
        thread = "event loop" if match.group(1) == "MainThread" else match.group(1)
        count = int(count_text)
        threads[thread] += count
        functions.setdefault(thread, Counter())[_where(stack.split(";")[1:])] += count
    wall = seconds * rate
    return {
        "seconds": seconds,
        "threads": {
            name: {
                "busy_pct": round(100 * count / wall, 1),
                "top": [(where, round(100 * n / wall, 1)) for where, n in functions[name].most_common(top)],
            }
            for name, count in threads.most_common()
        },
    }


def _where(frames: list[str]) -> str:
    """The deepest appliance frame and the leaf it was running, e.g. `imaging.decode > ImageFile.load`."""
    parsed = [m.groups() for m in map(_FRAME.match, frames) if m]
    ours = [(fn, path) for fn, path in parsed if path.startswith(("appliance/", "bench/"))]
    leaf = parsed[-1][0] if parsed else "?"
    if not ours:
        # Library code on the event loop (aiohttp's parser, asyncio): name the library and the leaf.
        lib = parsed[-1][1].split("/")[0] if parsed else "?"
        return f"{lib}: {leaf}"
    fn, path = ours[-1]
    module = path.removesuffix(".py").replace("/", ".").removeprefix("appliance.")
    return f"{module}.{fn}" if fn == leaf else f"{module}.{fn} > {leaf}"
