"""OpenVINO back end: device, performance hint, inference precision, compiled-model cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from ...errors import RuntimeLoadError
# One telemetry-free import of OpenVINO for the appliance and convert alike (re-exported for callers of this module).
from ...modeldir import import_openvino as import_openvino

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenVinoConfig:
    """`[runtime.openvino]`: where and how OpenVINO compiles the model."""

    device: Literal["CPU", "GPU", "NPU", "AUTO"] = "CPU"
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    # f32 by default: on CPUs with AMX OpenVINO would otherwise pick bf16 by
    # itself, and answers would drift from the parity-checked ones.
    inference_precision: Literal["f32", "bf16"] = "f32"
    cache_dir: Path | None = None
    threads: int = 0


class OpenVinoRuntime:
    """Runs an OpenVINO IR (or ONNX) artifact with a compiled model and one infer request."""

    name: ClassVar[str] = "openvino"
    formats: ClassVar[tuple[str, ...]] = ("openvino", "onnx")
    Config = OpenVinoConfig

    def __init__(self, config: OpenVinoConfig) -> None:
        self.config = config
        self._compiled: Any = None
        self._request: Any = None
        self._devices: list[str] = []
        self._kernels: list[str] = []

    def load(self, model_file: Path) -> None:
        ov = import_openvino()

        core = ov.Core()
        available = list(core.available_devices)
        device = self.config.device
        if device != "AUTO" and not any(d.split(".")[0] == device for d in available):
            raise RuntimeLoadError(
                f"runtime.openvino.device: {device} is not available on this machine "
                f"(available: {', '.join(available)})"
            )
        if self.config.cache_dir is not None:
            self.config.cache_dir.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(self.config.cache_dir)})
        properties: dict[str, Any] = {"PERFORMANCE_HINT": self.config.performance_hint}
        if device in ("CPU", "GPU"):
            properties["INFERENCE_PRECISION_HINT"] = self.config.inference_precision
        if self.config.threads and device == "CPU":
            properties["INFERENCE_NUM_THREADS"] = self.config.threads
        try:
            self._compiled = core.compile_model(str(model_file), device, properties)
        except Exception as exc:  # OpenVINO raises RuntimeError for everything
            raise RuntimeLoadError(f"openvino could not compile {model_file} for {device}: {exc}") from None
        self._request = self._compiled.create_infer_request()
        try:
            self._devices = list(self._compiled.get_property("EXECUTION_DEVICES"))
        except Exception:  # not every plugin reports it
            self._devices = [device]
        self._kernels = _kernels(self._compiled)
        log.info("openvino: compiled for %s (%s, %s)", ", ".join(self._devices),
                 self.config.performance_hint, self.config.inference_precision)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._request.infer({0: batch})
        return np.array(self._request.get_output_tensor(0).data, copy=True)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "version": import_openvino().get_version(),
            "device": ",".join(self._devices) or self.config.device,
            "performance_hint": self.config.performance_hint,
            "inference_precision": self.config.inference_precision,
            **({"kernels": self._kernels} if self._kernels else {}),
        }

    def close(self) -> None:
        self._request = None
        self._compiled = None


def _kernels(compiled: Any) -> list[str]:
    """The CPU kernels chosen for convolutions and matrix products, which name the instruction set (jit_avx2_I8).

    The same INT8 graph runs different integer kernels on different CPUs (docs/int8.md),
    so this is what tells one box's arithmetic from another's. Empty where the plugin
    does not say (GPU, NPU).
    """
    try:
        infos = [op.get_rt_info() for op in compiled.get_runtime_model().get_ops()]
        kernels = {i["primitiveType"].astype(str) for i in infos
                   if i["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul")}
    except Exception:  # rt_info keys are the CPU plugin's, not an API every device honours
        return []
    # "undef": an executor chosen at the first inference (FullyConnected), not a kernel yet.
    return sorted(k for k in kernels if not k.startswith("undef"))
