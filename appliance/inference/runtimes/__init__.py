"""Inference back ends: one module each behind the `Runtime` protocol.

`RUNTIMES` maps a config name to "module:Class"; a back end's module is
imported only when it is named, and imports its engine (onnxruntime,
openvino) only in `load`, so a box without OpenVINO fails only when OpenVINO
is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from ...importer import import_from_string

RUNTIMES: dict[str, str] = {
    "onnxruntime": "appliance.inference.runtimes.onnxruntime:OnnxRuntime",
    "openvino": "appliance.inference.runtimes.openvino:OpenVinoRuntime",
}


class Runtime(Protocol):
    """An engine that runs one model file on one device."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # manifest artifact formats it can load, preferred first

    def load(self, model_file: Path) -> None:
        """Compile the model for the configured device; raise RuntimeLoadError if it cannot."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 [N, 3, H, W] batch; return the [N, classes] output."""

    def describe(self) -> dict[str, Any]:
        """What really runs: runtime, device, providers or properties (for logs and /v1/info)."""

    def close(self) -> None:
        """Release the engine's memory."""


class RuntimeClass(Protocol):
    """A back end class as `RUNTIMES` names it: its declarations, and a constructor taking its Config."""

    # Read-only properties, not attributes: each class's own are narrower (`Config` is
    # its own dataclass), which a mutable protocol attribute would refuse.
    @property
    def name(self) -> str:
        """The config name it is registered under."""

    @property
    def formats(self) -> tuple[str, ...]:
        """Manifest artifact formats it can load, preferred first."""

    @property
    def Config(self) -> type:
        """The frozen dataclass of its `[runtime.<name>]` table."""

    def __call__(self, config: Any) -> Runtime:
        """A runtime with nothing loaded yet."""


if TYPE_CHECKING:
    # `RUNTIMES` holds strings so that only the chosen back end is imported; this, never
    # run, holds each class to the protocols above (`runtime_class` returns what getattr gives).
    from .onnxruntime import OnnxRuntime
    from .openvino import OpenVinoRuntime

    _REGISTERED: tuple[RuntimeClass, ...] = (OnnxRuntime, OpenVinoRuntime)


def runtime_class(name: str) -> RuntimeClass:
    """Import and return the back end class registered under `name`."""
    cls: RuntimeClass = import_from_string(RUNTIMES[name])
    return cls


def runtime_config_class(name: str) -> type:
    """The frozen dataclass holding the named back end's `[runtime.<name>]` table."""
    return runtime_class(name).Config


def create_runtime(name: str, config: Any) -> Runtime:
    """Instantiate the named back end with its parsed config (nothing loaded yet)."""
    return runtime_class(name)(config)
