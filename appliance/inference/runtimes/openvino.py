"""OpenVINO back end: device, performance hint, inference precision, compiled-model cache."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal, cast

import numpy as np

from ...errors import RuntimeLoadError

log = logging.getLogger(__name__)


def import_openvino() -> Any:
    """`import openvino`, with its usage telemetry off; every import of it should go through here.

    Importing openvino also imports its model converter, which writes a client id under
    ~/intel at once and reports each conversion to Google Analytics unless the user opted
    out (openvino-telemetry: a missing consent file counts as consent). Neither the
    appliance nor `convert` reports anything to anyone: with openvino_telemetry made
    unimportable, OpenVINO falls back to its own no-op stub.
    """
    # None: `import` raises ImportError (the import system's documented block); typeshed
    # types sys.modules as modules only, hence the cast.
    sys.modules.setdefault("openvino_telemetry", cast(ModuleType, None))
    import openvino

    return openvino


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
        log.info("openvino: compiled for %s (%s, %s)", ", ".join(self._devices),
                 self.config.performance_hint, self.config.inference_precision)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._request.infer({0: batch})
        return np.array(self._request.get_output_tensor(0).data, copy=True)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": ",".join(self._devices) or self.config.device,
            "performance_hint": self.config.performance_hint,
            "inference_precision": self.config.inference_precision,
        }

    def close(self) -> None:
        self._request = None
        self._compiled = None
