"""Run a batch through each engine the parity report compares: PyTorch, and the appliance's own runtimes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

Runner = Callable[[np.ndarray], np.ndarray]
BATCH = 16


def torch_runner(module: Callable[[Any], Any]) -> Runner:
    """PyTorch FP32 probabilities (softmax of the module's logits): the reference."""
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(module(torch.from_numpy(batch)), dim=1).numpy().astype(np.float32)

    return run


def onnx_runner(path: Path) -> Runner:
    """The appliance's ONNX Runtime back end, default settings (CPU), as the server runs it."""
    return _appliance_runner("onnxruntime", path)


def openvino_runner(xml_path: Path, *, precision: str = "f32") -> Runner:
    """The appliance's OpenVINO back end on CPU, inference precision pinned (f32 unless asked)."""
    return _appliance_runner("openvino", xml_path, inference_precision=precision)


def _appliance_runner(name: str, path: Path, **settings: str) -> Runner:
    from appliance.inference.runtimes import create_runtime, runtime_class

    runtime = create_runtime(name, runtime_class(name).Config(**settings))
    runtime.load(path)
    return runtime.infer


def run_all(runner: Runner, tensors: np.ndarray, *, desc: str | None = None) -> np.ndarray:
    """Probabilities for every image, in batches, with a progress bar on stderr when `desc` is set."""
    outputs = []
    starts = range(0, len(tensors), BATCH)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        outputs.append(runner(np.ascontiguousarray(tensors[start : start + BATCH])))
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
