"""Artifact parity: how each artifact's probabilities agree with PyTorch FP32 on the reference decode.

Artifacts run on the appliance's own runtime classes, default settings (CPU), as the server runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from appliance.inference.runtimes import Runtime, create_runtime, runtime_class
from appliance.modeldir import RUNTIME_OF_FORMAT

# Anything that maps a batch of tensors to probabilities: a loaded Runtime's `infer`, PyTorch's reference.
Runner = Callable[[np.ndarray], np.ndarray]

# An export check: a wrong graph moves probabilities by 1e-2 and more. A deep network with
# random residual branches amplifies float32 reordering to 1.1e-4 on 12 MP photos, so 1e-3.
FP32_BAR = {"max_abs_dp": 1e-3, "top1_agreement": 1.0}
INT8_BAR = {"top1_agreement": 0.99}
FP16_BAR = {"top1_agreement": 0.99}


def bar_for(precision: str) -> dict:
    """The parity bar an artifact of this precision must meet."""
    return dict({"fp32": FP32_BAR, "int8": INT8_BAR, "fp16": FP16_BAR}[precision])


def top1_agreement(reference: np.ndarray, probs: np.ndarray) -> float:
    """Fraction of images whose arg-max matches the reference's."""
    if len(reference) == 0:
        return 1.0
    return float(np.mean(reference.argmax(1) == probs.argmax(1)))


@dataclass(frozen=True)
class Parity:
    """One artifact against PyTorch FP32 on the held-out images."""

    images: int
    max_abs_dp: float
    top1_agreement: float
    per_class_agreement: dict[str, float]
    bar: dict
    passed: bool

    def to_json(self) -> dict:
        """The manifest's `parity` table."""
        return {
            "images": self.images,
            "max_abs_dp": self.max_abs_dp,
            "top1_agreement": self.top1_agreement,
            "per_class_agreement": self.per_class_agreement,
            "bar": self.bar,
            "passed": self.passed,
        }


def measure(reference: np.ndarray, probs: np.ndarray, labels: list[str], bar: dict) -> Parity:
    """Compare probabilities with the reference.

    Per-class agreement is over the images PyTorch puts in that class; classes PyTorch
    predicts for none of the held-out images are left out rather than reported as 1.0.
    """
    ref_top, top = reference.argmax(1), probs.argmax(1)
    per_class = {
        label: float(np.mean(top[ref_top == k] == k)) for k, label in enumerate(labels) if np.any(ref_top == k)
    }
    max_dp = float(np.max(np.abs(reference - probs))) if len(reference) else 0.0
    agreement = top1_agreement(reference, probs)
    passed = agreement >= bar.get("top1_agreement", 0.0) and max_dp <= bar.get("max_abs_dp", np.inf)
    return Parity(len(reference), max_dp, agreement, per_class, bar, bool(passed))


def runtime_for(fmt: str, precision: str = "f32") -> Runtime:
    """The appliance runtime that serves artifacts of `fmt`, at this inference precision; nothing loaded yet."""
    name = RUNTIME_OF_FORMAT[fmt]
    config = runtime_class(name).Config()
    if precision != "f32":
        config = dataclasses.replace(config, inference_precision=precision)
    return create_runtime(name, config)


def load_runtime(file: Path, fmt: str) -> Runtime:
    """The appliance runtime for `fmt` with `file` loaded, default settings (CPU, f32)."""
    runtime = runtime_for(fmt)
    runtime.load(file)
    return runtime


def infer_all(runner: Runner, tensors: np.ndarray, *, batch: int, desc: str | None = None) -> np.ndarray:
    """Probabilities for every tensor, in batches, with a progress bar on stderr when `desc` is set."""
    outputs = []
    starts = range(0, len(tensors), batch)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None):
        outputs.append(runner(np.ascontiguousarray(tensors[start : start + batch])))
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
