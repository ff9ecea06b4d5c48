"""ONNX -> OpenVINO IR, and whether this CPU can measure the bf16 serving option."""

from __future__ import annotations

from pathlib import Path

from appliance.modeldir import import_openvino

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
