"""Run the whole benchmark and write `bench/results/<timestamp>/report.md` with PNG plots.

    .venv/bin/python -m bench            # full run: about 13 minutes on 2 cores
    .venv/bin/python -m bench --quick    # smoke run: about 4 minutes, rough numbers

Needs the bench extra (`pip install -e '.[bench]'`: FastAPI, uvicorn and
python-multipart for the baseline, matplotlib, py-spy), the convert extra
(PyTorch for the baseline), wrk (`apt-get install wrk`; without it a slower
asyncio load generator is used and the report says so) and a built model
(`python -m convert demo`). Nothing is installed at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from collections.abc import Callable

from . import instruction_sets, suite, swap
from .load import generator_name
from .procs import ROOT
from .report import write_report

SECTIONS: dict[str, Callable[[suite.Bench], Any]] = {
    "raw_runtimes": suite.raw_runtimes,
    "end_to_end": suite.end_to_end,
    "server_overhead": suite.server_overhead,
    "micro_batching": suite.micro_batching,
    "cold_start": suite.cold_start,
    "decode_modes": suite.decode_modes,
    "profile": suite.profile,
    "swap": swap.section,
}
NEEDED = {"fastapi": "bench", "uvicorn": "bench", "multipart": "bench", "matplotlib": "bench", "torch": "convert",
          "torchvision": "convert"}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    versions = {}
    for name in ("torch", "onnxruntime", "openvino", "aiohttp", "fastapi", "uvicorn"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            pass
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:"))
    return {"cpu": cpu, "isa": instruction_sets(), "cores": os.cpu_count(), "memory_gb": round(memory_kb / 2**20), "kernel": platform.release(),
            "python": platform.python_version(), "versions": versions, "load_before": _load()}


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 s cells, fewer variants")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo",
                        help="model directory (default: models/demo, built by `python -m convert demo`)")
    parser.add_argument("--checkpoint", type=Path,
                        help="the model's PyTorch checkpoint for the baseline (default: rebuild the demo's)")
    parser.add_argument("--only", help=f"comma list of sections: {', '.join(SECTIONS)}")
    parser.add_argument("--cell-seconds", type=int, help="seconds per load cell (default 10; quick 3)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<timestamp>)")
    parser.add_argument("--rewrite-report", type=Path, metavar="DIR",
                        help="only rewrite DIR/report.md and its plots from DIR/results.json")
    args = parser.parse_args(argv)
    if args.rewrite_report:
        results = json.loads((args.rewrite_report / "results.json").read_text())
        print(write_report(args.rewrite_report, results))
        return 0

    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        extras = sorted({NEEDED[name] for name in missing})
        print(f"bench: missing {', '.join(missing)}: pip install -e '.[{','.join(extras)}]'", file=sys.stderr)
        return 1
    from appliance.inference.model import resolve_model_dir

    from .baseline.checkpoint import demo_checkpoint

    model_dir = resolve_model_dir(args.model.resolve())
    sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}")
    started = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or ROOT / "bench" / "results" / started).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    say(f"writing to {out}")
    checkpoint = args.checkpoint
    if checkpoint is None and ("raw_runtimes" in sections or "end_to_end" in sections):
        say("baseline checkpoint: the demo's, cached in .cache/bench (rebuilt when missing: about a minute)")
        checkpoint = demo_checkpoint(model_dir, ROOT / ".cache" / "bench")
    from .images import make_images

    workloads = make_images(out / "inputs")
    cell_s = args.cell_seconds or (3 if args.quick else 10)
    bench = suite.Bench(out=out, model_dir=model_dir, checkpoint=checkpoint or Path(), workloads=workloads,
                        quick=args.quick, cell_s=cell_s, raw_s=0.3 if args.quick else 1.0, say=say)
    results: dict[str, Any] = {"started": started, "quick": args.quick, "cell_s": cell_s,
                               "generator": generator_name(), "model_dir": str(model_dir), "machine": machine()}
    t0 = time.monotonic()
    try:
        for name in sections:
            results[name] = SECTIONS[name](bench)
            results["machine"]["load_after"] = _load()
            (out / "results.json").write_text(json.dumps(results, indent=1))
            write_report(out, results)  # after every section, so an interrupted run still leaves a report
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    say(f"done in {time.monotonic() - t0:.0f} s: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
