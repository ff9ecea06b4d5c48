"""Run a batch through each engine the parity report compares: PyTorch, ONNX Runtime, OpenVINO."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

Runner = Callable[[np.ndarray], np.ndarray]
BATCH = 16


def torch_runner(module) -> Runner:
    """PyTorch FP32 probabilities (softmax of the module's logits): the reference."""
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(module(torch.from_numpy(batch)), dim=1).numpy().astype(np.float32)

    return run


def onnx_runner(path: Path) -> Runner:
    """An ONNX Runtime CPU session with every graph optimisation on, as the server runs it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: batch})[0], dtype=np.float32)

    return run


def openvino_runner(xml_path: Path, *, precision: str = "f32") -> Runner:
    """An OpenVINO CPU compile of an IR with the inference precision pinned."""
    from .openvino import OpenVINORunner

    return OpenVINORunner(xml_path, precision=precision)


def run_all(runner: Runner, tensors: np.ndarray, *, desc: str | None = None) -> np.ndarray:
    """Probabilities for every image, in batches, with a progress bar on stderr when `desc` is set."""
    outputs = []
    starts = range(0, len(tensors), BATCH)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        outputs.append(runner(np.ascontiguousarray(tensors[start : start + BATCH])))
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
