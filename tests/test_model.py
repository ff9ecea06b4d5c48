"""Model directories: resolution, artifact choice, integrity, self-check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ModelError
from appliance.inference.model import choose, load_model, read_manifest, resolve_model_dir
from appliance.inference.paths import Wanted

from .conftest import rewrite_manifest


def load(path: Path, artifact: str = "auto", runtime: str = "onnxruntime") -> Any:
    from appliance.config import parse_config

    config = parse_config({"runtime": {"backend": runtime}})
    return load_model(path, Wanted(runtime, "f32", artifact), config.runtime.selected, max_batch=4)


def chosen(version: Path, formats: tuple[str, ...], artifact: str = "auto") -> Any:
    """The served path's artifact for a runtime loading `formats` (onnxruntime: onnx only)."""
    runtime = "onnxruntime" if formats == ("onnx",) else "openvino"
    choice = choose(read_manifest(version), Wanted(runtime, "f32", artifact), formats)
    return read_manifest(version).artifacts[choice.path.artifact]


def test_highest_version_is_served(model_copy: Path) -> None:
    import shutil

    shutil.copytree(model_copy, model_copy.parent / "7")
    (model_copy.parent / "10").mkdir()  # no manifest: not a version
    assert resolve_model_dir(model_copy.parent) == model_copy.parent / "7"
    assert resolve_model_dir(model_copy) == model_copy


def test_checkpoint_path_names_the_convert_command(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ham10000_resnet50_tuned_best.pt"
    checkpoint.write_bytes(b"PK")
    with pytest.raises(ModelError) as caught:
        resolve_model_dir(checkpoint)
    assert str(caught.value) == (
        f"model.path points at a PyTorch checkpoint ({checkpoint}); convert it first: "
        f"python -m convert {checkpoint} --name ham10000_resnet50_tuned_best --out models --calibration-dir PHOTOS, "
        "then set model.path (MODEL_PATH) to models/ham10000_resnet50_tuned_best"
    )


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"does not exist \(build the demo with: python -m convert demo\)$"):
        resolve_model_dir(tmp_path / "nowhere")


def test_auto_prefers_the_fastest_passing_artifact(model_copy: Path) -> None:
    def add_int8(manifest: dict[str, Any], degraded: bool) -> None:
        manifest["artifacts"]["onnx-int8"] = {**manifest["artifacts"]["onnx-fp32"], "precision": "int8",
                                              "degraded": degraded}

    rewrite_manifest(model_copy, lambda m: add_int8(m, degraded=False))
    assert chosen(model_copy, ("onnx",), "auto").key == "onnx-int8"
    assert chosen(model_copy, ("openvino", "onnx"), "auto").key == "onnx-int8"
    rewrite_manifest(model_copy, lambda m: add_int8(m, degraded=True))
    assert chosen(model_copy, ("onnx",), "auto").key == "onnx-fp32"
    assert chosen(model_copy, ("onnx",), "onnx-int8").degraded
    assert chosen(model_copy, ("openvino", "onnx"), "auto").key == "openvino-fp32"


def test_unknown_artifact_is_named(model_copy: Path) -> None:
    with pytest.raises(ModelError, match=r"model.artifact: 'onnx-int4' is not in .*model.json \(has: onnx-fp32, openvino-fp32\); set model.artifact = \"auto\""):
        chosen(model_copy, ("onnx",), "onnx-int4")
    with pytest.raises(ModelError, match=r'model.artifact: .openvino-fp32. is openvino; runtime.backend "onnxruntime" loads onnx'):
        chosen(model_copy, ("onnx",), "openvino-fp32")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_loads_and_self_checks_on_every_runtime(tiny_model_dir: Path, runtime: str) -> None:
    model = load(tiny_model_dir, runtime=runtime)
    assert model.selfcheck_max_abs_dp < 1e-3
    assert model.describe()["runtime"] == runtime
    model.runtime.close()


def test_tampered_weights_fail_the_hash_check(model_copy: Path) -> None:
    data = bytearray((model_copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (model_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model.onnx: sha256 [0-9a-f]{12}… does not match the manifest's [0-9a-f]{12}…$"):
        load(model_copy)


def test_missing_artifact_file(model_copy: Path) -> None:
    (model_copy / "openvino/fp32/model.bin").unlink()
    with pytest.raises(ModelError, match=r"openvino/fp32/model.bin: missing \(artifact openvino-fp32\)$"):
        load(model_copy, runtime="openvino")


def test_self_check_fails_when_answers_drift(model_copy: Path) -> None:
    def shift(manifest: dict[str, Any]) -> None:
        probabilities = manifest["golden"][2]["probabilities"]
        manifest["golden"][2]["probabilities"] = probabilities[1:] + probabilities[:1]

    rewrite_manifest(model_copy, shift)
    with pytest.raises(ModelError) as caught:
        load(model_copy)
    message = str(caught.value)
    assert message.startswith("self-check failed for onnx-fp32/fast on golden/2.jpg: max |dp| ")
    assert "(allowed 0.001), top-1 " in message
    assert message.endswith("; refusing to serve: serve another path that passed (onnx-fp32/exact) "
                            "with model.artifact / imaging.decode, or reconvert on this machine")


def test_label_count_mismatch_stops_loading(model_copy: Path) -> None:
    def more_labels(manifest: dict[str, Any]) -> None:
        manifest["labels"].append("extra")
        for golden in manifest["golden"]:
            golden["probabilities"].append(0.0)

    rewrite_manifest(model_copy, more_labels)
    with pytest.raises(ModelError, match=r"model.onnx: output shape \[1, 7\] for a batch of 1; expected \[1, 8\] for labels akiec"):
        load(model_copy)


def test_input_shape_mismatch(model_copy: Path) -> None:
    rewrite_manifest(model_copy, lambda m: m["input"].update(shape=[-1, 3, 299, 299]))
    with pytest.raises(ModelError, match=r"input shape \[-1, 3, 299, 299\] does not match the 224x224 crop$"):
        read_manifest(model_copy)
