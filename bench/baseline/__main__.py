"""Serve the baseline: `python -m bench.baseline --checkpoint PT --storage DIR [--port 8100] [--threaded]`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn

from .server import create_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the PyTorch checkpoint (MODEL_PATH)")
    parser.add_argument("--storage", type=Path, required=True, help="STORAGE_ROOT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threaded", action="store_true", help="run the blocking steps in a thread pool")
    args = parser.parse_args()
    app = create_app(args.checkpoint, args.storage, blur_threshold=float(os.environ.get("BLUR_THRESHOLD", "100")),
                     threaded=args.threaded)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
