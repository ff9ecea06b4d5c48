"""The command line every stand-alone benchmark shares (bench.predictor, bench.scale): model, cell length, JSON out."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import procs
from .load import generator_name

Rows = list[dict[str, Any]]


def main(name: str, doc: str | None, run: Callable[[Path, int, Path], Rows], table: Callable[[Rows], str],
         argv: list[str] | None = None, note: str = "") -> int:
    """Parse `python -m bench.NAME`'s options, run it in a temporary directory, print its table."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=procs.ROOT / "models" / "demo",
                        help="model directory (default: models/demo, built by `python -m convert demo`)")
    parser.add_argument("--cell-seconds", type=int, default=10, help="seconds per load cell (default 10)")
    parser.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as work:
        rows = run(args.model.resolve(), args.cell_seconds, Path(work))
    print(f"load generator: {generator_name()}; {args.cell_seconds} s per cell{note}")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0
