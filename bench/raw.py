"""Raw runtime speed: ms per image at batch 1 and the best images/s over batch sizes, one runtime per process.

`python -m bench.raw NAME --model DIR [--checkpoint PT] [--seconds S] [--batches 1,2,..]`
prints one JSON object. The ONNX Runtime and OpenVINO rows use the
appliance's own runtime classes (the session options and compile properties
it serves with); PyTorch runs the baseline's eager model. Inputs are random
normalised tensors: these models' speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

# name -> (runtime, artifact, runtime config overrides); "pytorch" is the baseline's eager model.
RUNTIMES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pytorch-fp32": ("pytorch", "", {}),
    "onnxruntime-fp32": ("onnxruntime", "onnx-fp32", {}),
    "onnxruntime-int8": ("onnxruntime", "onnx-int8", {}),
    "openvino-fp32": ("openvino", "openvino-fp32", {"inference_precision": "f32"}),
    "openvino-bf16": ("openvino", "openvino-fp32", {"inference_precision": "bf16"}),
    "openvino-int8": ("openvino", "openvino-int8", {}),
}


def _load(name: str, model_dir: Path, checkpoint: Path | None) -> Callable[[np.ndarray], Any]:
    runtime_name, artifact_key, overrides = RUNTIMES[name]
    if runtime_name == "pytorch":
        import torch

        from bench.baseline.server import load_model

        model = load_model(checkpoint)

        def infer(batch: np.ndarray) -> Any:
            with torch.no_grad():  # as the old server ran it
                return model(torch.from_numpy(batch))

        return infer
    from appliance.inference.model import read_manifest
    from appliance.inference.runtimes import create_runtime, runtime_config_class

    manifest = read_manifest(model_dir)
    runtime = create_runtime(runtime_name, runtime_config_class(runtime_name)(**overrides))
    runtime.load(model_dir / manifest.artifacts[artifact_key].file)
    return runtime.infer


def measure(infer: Callable[[np.ndarray], Any], batches: list[int], seconds: float) -> dict[str, Any]:
    """Per batch size: median ms per call and images/s over about `seconds` of calls."""
    inputs = np.random.default_rng(0).standard_normal((max(batches), 3, 224, 224)).astype(np.float32)
    rows = {}
    for n in batches:
        batch = np.ascontiguousarray(inputs[:n])
        infer(batch)  # the first call of a shape pays for memory planning and kernel choice
        times: list[float] = []
        cpu = time.process_time()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(times) < 3:
            t = time.perf_counter()
            infer(batch)
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        rows[n] = {"ms_per_call": round(statistics.median(times) * 1000, 2), "calls": len(times),
                   "images_per_s": round(n * len(times) / elapsed, 1),
                   "cpu_ms_per_img": round(1000 * cpu / (n * len(times)), 1)}
    best = max(rows, key=lambda n: rows[n]["images_per_s"])
    return {"batch1_ms": rows[1]["ms_per_call"] if 1 in rows else None, "best_images_per_s": rows[best]["images_per_s"],
            "best_batch": best, "batches": rows}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__)
    parser.add_argument("name", choices=sorted(RUNTIMES))
    parser.add_argument("--model", type=Path, required=True, help="the model version directory")
    parser.add_argument("--checkpoint", type=Path, help="the PyTorch checkpoint (pytorch-fp32)")
    parser.add_argument("--seconds", type=float, default=1.5, help="per batch size")
    parser.add_argument("--batches", default="1,2,3,4,5,6,7,8")
    args = parser.parse_args()
    if args.name == "openvino-bf16":
        from convert.openvino import cpu_has_bf16  # only here: the other runtimes' RSS must not include OpenVINO

        if not cpu_has_bf16():
            print(json.dumps({"name": args.name, "supported": False}))
            return
    started = time.perf_counter()
    infer = _load(args.name, args.model, args.checkpoint)
    load_s = time.perf_counter() - started
    result = measure(infer, [int(b) for b in args.batches.split(",")], args.seconds)
    print(json.dumps({"name": args.name, "supported": True, "load_s": round(load_s, 2), **result,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
