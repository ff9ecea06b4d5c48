"""The Runtime contract, run over every registered back end with the same assertions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import parse_config
from appliance.errors import RuntimeLoadError
from appliance.inference.runtimes import RUNTIMES, create_runtime, runtime_class

from .conftest import BIAS, LABELS, WEIGHTS

ARTIFACT = {"onnxruntime": "model.onnx", "openvino": "openvino/fp32/model.xml"}


def expected(batch: np.ndarray) -> np.ndarray:
    logits = batch.mean(axis=(2, 3)).astype(np.float64) @ WEIGHTS + BIAS
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture(params=sorted(RUNTIMES))
def runtime_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_every_runtime_answers_like_the_reference(runtime_name: str, tiny_model_dir: Path) -> None:
    config = parse_config({}).runtime.options[runtime_name]
    runtime = create_runtime(runtime_name, config)
    runtime.load(tiny_model_dir / ARTIFACT[runtime_name])
    rng = np.random.default_rng(0)
    for n in (1, 3, 8):
        batch = rng.normal(size=(n, 3, 224, 224)).astype(np.float32)
        out = runtime.infer(batch)
        assert out.shape == (n, len(LABELS))
        np.testing.assert_allclose(out, expected(batch), atol=1e-5)
    described = runtime.describe()
    assert described["runtime"] == runtime_name
    assert described["device"].startswith("CPU")
    runtime.close()


def test_every_runtime_refuses_a_broken_file(runtime_name: str, tmp_path: Path) -> None:
    broken = tmp_path / Path(ARTIFACT[runtime_name]).name
    broken.write_bytes(b"not a model")
    runtime = create_runtime(runtime_name, parse_config({}).runtime.options[runtime_name])
    with pytest.raises(RuntimeLoadError, match=f"{runtime_name} could not"):
        runtime.load(broken)


def test_runtime_modules_declare_formats(runtime_name: str) -> None:
    cls = runtime_class(runtime_name)
    assert cls.name == runtime_name
    assert cls.formats and set(cls.formats) <= {"onnx", "openvino"}


def test_missing_onnx_provider_is_an_error_not_a_silent_switch(tiny_model_dir: Path) -> None:
    config = parse_config({"runtime": {"onnxruntime": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}})
    runtime = create_runtime("onnxruntime", config.runtime.options["onnxruntime"])
    with pytest.raises(RuntimeLoadError) as caught:
        runtime.load(tiny_model_dir / "model.onnx")
    assert str(caught.value).startswith(
        "runtime.onnxruntime.providers: CUDAExecutionProvider not available in this onnxruntime build")
    assert str(caught.value).endswith("set runtime.onnxruntime.allow_fallback = true to fall back")


def test_onnx_provider_fallback_warns(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config({"runtime": {"onnxruntime": {
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "allow_fallback": True}}})
    runtime = create_runtime("onnxruntime", config.runtime.options["onnxruntime"])
    runtime.load(tiny_model_dir / "model.onnx")
    assert runtime.describe()["providers"] == ["CPUExecutionProvider"]
    assert any("FALLING BACK" in r.message and "CUDAExecutionProvider" in r.message for r in caplog.records)


def test_missing_openvino_device_is_an_error(tiny_model_dir: Path) -> None:
    config = parse_config({"runtime": {"openvino": {"device": "NPU"}}})
    runtime = create_runtime("openvino", config.runtime.options["openvino"])
    with pytest.raises(RuntimeLoadError, match=r"^runtime.openvino.device: NPU is not available on this machine \(available: CPU"):
        runtime.load(tiny_model_dir / "openvino/fp32/model.xml")


def test_openvino_compiled_model_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = parse_config({"runtime": {"openvino": {"cache_dir": str(tmp_path / "cache")}}})
    runtime = create_runtime("openvino", config.runtime.options["openvino"])
    runtime.load(tiny_model_dir / "openvino/fp32/model.xml")
    assert any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("spinning", [False, True])
def test_onnx_thread_spinning_follows_the_config(tiny_model_dir: Path, spinning: bool) -> None:
    config = parse_config({"runtime": {"onnxruntime": {"spinning": spinning}}} if spinning else {})
    runtime = create_runtime("onnxruntime", config.runtime.options["onnxruntime"])
    runtime.load(tiny_model_dir / "model.onnx")
    options = runtime._session.get_session_options()  # the session as onnxruntime built it
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    runtime.close()


def test_openvino_is_imported_without_its_telemetry(tmp_path: Path) -> None:
    # In a fresh process, as on a clinic's box: a home directory, none of the variables marking a
    # CI job. A plain `import openvino` writes ~/intel/openvino_ga_cid and stats at once.
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    code = ("from appliance.inference.runtimes.openvino import import_openvino\n"
            "ov = import_openvino()\n"
            "ov.convert_model\n"
            "print(ov.Core().available_devices)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "CPU" in done.stdout
    assert list(home.iterdir()) == []


def test_onnxruntime_runs_without_its_telemetry(tmp_path: Path, tiny_model_dir: Path) -> None:
    # ONNX Runtime 1.32 writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/deviceid at the first
    # session unless ORT_DISABLE_TELEMETRY is set when it is imported; the package sets it.
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    code = ("from appliance.config import parse_config\n"
            "from appliance.inference.runtimes import create_runtime\n"
            "runtime = create_runtime('onnxruntime', parse_config({}).runtime.options['onnxruntime'])\n"
            f"runtime.load({str(tiny_model_dir / 'model.onnx')!r})\n"
            "print(runtime.describe()['runtime'])\n")
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "onnxruntime"
    assert list(home.iterdir()) == []
