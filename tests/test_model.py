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


def to_format_2(version: Path, ms: dict[str, float]) -> None:
    """Rewrite the tiny model's manifest as convert writes format 2: served paths, golden hashes, digest."""
    import hashlib
    import json

    manifest = json.loads((version / "model.json").read_text())
    manifest["format"] = 2
    manifest["served_paths"] = {}
    for key, artifact in manifest["artifacts"].items():
        runtime = "openvino" if artifact["format"] == "openvino" else "onnxruntime"
        for decode in ("fast", "exact"):
            manifest["served_paths"][f"{key}/{decode}"] = {
                "artifact": key, "runtime": runtime, "decode": decode, "inference_precision": "f32", "passed": True,
                "ms_per_image": ms[f"{key}/{decode}"], "selfcheck_max_abs_dp": 1e-3,
                "images": 5, "top1_agreement": 1.0, "max_abs_dp": 1e-5}
    for golden in manifest["golden"]:
        golden["sha256"] = hashlib.sha256((version / golden["file"]).read_bytes()).hexdigest()
    text = json.dumps(manifest).encode()
    (version / "model.json").write_bytes(text)
    (version / "model.json.sha256").write_text(hashlib.sha256(text).hexdigest() + "  model.json\n")


TIMES = {"onnx-fp32/fast": 20.0, "onnx-fp32/exact": 10.0, "openvino-fp32/fast": 30.0, "openvino-fp32/exact": 40.0}


def test_format_2_serves_the_fastest_measured_path(model_copy: Path) -> None:
    to_format_2(model_copy, TIMES)
    model = load(model_copy)
    assert model.served.key == "onnx-fp32/exact"
    assert model.describe()["decode"] == "exact" and model.describe()["served_path"] == "onnx-fp32/exact"
    model.runtime.close()
    model = load(model_copy, runtime="openvino")
    assert model.served.key == "openvino-fp32/fast"
    model.runtime.close()


def test_a_changed_manifest_is_refused(model_copy: Path) -> None:
    to_format_2(model_copy, TIMES)
    text = (model_copy / "model.json").read_text()
    (model_copy / "model.json").write_text(text.replace('"selfcheck_max_abs_dp": 0.001', '"selfcheck_max_abs_dp": 0.9'))
    with pytest.raises(ModelError, match=r"model.json: sha256 [0-9a-f]{12}… does not match model.json.sha256's "
                                         r"[0-9a-f]{12}…; the manifest was changed after convert wrote it: copy it again or reconvert$"):
        load(model_copy)
    (model_copy / "model.json.sha256").unlink()
    with pytest.raises(ModelError, match=r"model.json.sha256: missing or empty; the model directory is incomplete: "
                                         r"copy it again or reconvert$"):
        load(model_copy)


def test_a_changed_golden_image_is_refused(model_copy: Path) -> None:
    to_format_2(model_copy, TIMES)
    data = bytearray((model_copy / "golden/0.jpg").read_bytes())
    data[200] ^= 0x01
    (model_copy / "golden/0.jpg").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"golden/0.jpg: sha256 [0-9a-f]{12}… does not match the manifest's [0-9a-f]{12}…$"):
        load(model_copy)


def test_an_unknown_format_is_refused(model_copy: Path) -> None:
    rewrite_manifest(model_copy, lambda m: m.update(format=3))
    with pytest.raises(ModelError, match=r"model.json: format 3 is not one this appliance reads \(1, 2\); "
                                         r"upgrade the appliance or reconvert with its convert$"):
        read_manifest(model_copy)
