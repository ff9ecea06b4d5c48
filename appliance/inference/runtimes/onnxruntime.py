"""ONNX Runtime back end: execution providers in order, the active one reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...errors import RuntimeLoadError

log = logging.getLogger(__name__)

# The old server's MODEL_DEVICE, as the config keys it sets: "cpu" is what every runtime
# does by default (nothing to set); "cuda" meant this engine with its CUDA provider first.
LEGACY_DEVICES: dict[str, dict[tuple[str, ...], Any]] = {
    "cpu": {},
    "cuda": {
        ("runtime", "backend"): "onnxruntime",
        ("runtime", "onnxruntime", "providers"): ["CUDAExecutionProvider", "CPUExecutionProvider"],
    },
}


@dataclass(frozen=True)
class OnnxRuntimeConfig:
    """`[runtime.onnxruntime]`: providers in order of preference, threads, fallback policy."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    allow_fallback: bool = False
    threads: int = 0
    spinning: bool = False


class OnnxRuntime:
    """Runs an ONNX artifact in an `onnxruntime.InferenceSession`."""

    name: ClassVar[str] = "onnxruntime"
    formats: ClassVar[tuple[str, ...]] = ("onnx",)
    Config = OnnxRuntimeConfig

    def __init__(self, config: OnnxRuntimeConfig) -> None:
        self.config = config
        self._session: Any = None
        self._input = ""
        self._active: list[str] = []

    def load(self, model_file: Path) -> None:
        import onnxruntime as ort

        wanted = list(self.config.providers)
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            self._refuse_or_warn(
                f"runtime.onnxruntime.providers: {', '.join(missing)} not available in this onnxruntime "
                f"build (available: {', '.join(available)})"
            )
            wanted = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.config.threads:
            options.intra_op_num_threads = self.config.threads
        options.inter_op_num_threads = 1
        # Spinning workers wait for each other at every barrier by burning a core; on a
        # small box that core is the one decoding the next upload (bench/NOTES.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.config.spinning else "0")
        try:
            self._session = ort.InferenceSession(str(model_file), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeLoadError(f"onnxruntime could not load {model_file}: {exc}") from None
        self._active = list(self._session.get_providers())
        # A provider that is built in but fails to initialise (no driver, no
        # device) is dropped by onnxruntime with only a log line: catch that.
        dropped = [p for p in wanted if p not in self._active]
        if dropped:
            self._refuse_or_warn(
                f"runtime.onnxruntime.providers: {', '.join(dropped)} failed to initialise "
                f"(active: {', '.join(self._active)})"
            )
        self._input = self._session.get_inputs()[0].name
        log.info("onnxruntime: active providers %s", ", ".join(self._active))

    def _refuse_or_warn(self, message: str) -> None:
        if not self.config.allow_fallback:
            raise RuntimeLoadError(message + "; set runtime.onnxruntime.allow_fallback = true to fall back")
        log.warning("FALLING BACK: %s", message)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(None, {self._input: batch})[0]

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        device = self._active[0].removesuffix("ExecutionProvider") if self._active else ""
        return {"runtime": self.name, "version": ort.__version__, "device": device, "providers": list(self._active)}

    def close(self) -> None:
        self._session = None
