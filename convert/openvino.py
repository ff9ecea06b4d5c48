"""ONNX -> OpenVINO IR, and compiling an IR for the parity runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.inference.runtimes.openvino import import_openvino

ov = import_openvino()


def convert_ir(onnx_path: Path, xml_path: Path, *, compress_to_fp16: bool = False) -> list[Path]:
    """Convert an ONNX graph (FP32 or QDQ INT8) to IR at `xml_path`; return the files written."""
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return [xml_path, xml_path.with_suffix(".bin")]


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 or AMX); else OpenVINO would emulate or refuse it."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINORunner:
    """An IR compiled for CPU with f32 inference precision forced.

    On CPUs with AMX OpenVINO picks bf16 by itself, which would hide (or cause) parity
    differences; the parity bars are about the graph, so the precision is pinned.
    """

    def __init__(self, xml_path: Path, *, precision: str = "f32"):
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision}
        self._compiled = core.compile_model(str(xml_path), "CPU", config)
        self._request = self._compiled.create_infer_request()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: batch})
        return np.asarray(result[self._compiled.output(0)], dtype=np.float32).copy()
