"""Choosing the served path: the fastest that met the bar, and refusals that name the fix."""

from __future__ import annotations

import pytest

from appliance.errors import ModelError
from appliance.inference.paths import Wanted, choose_path
from appliance.modeldir import ServedPath

FIGURES = {"images": 40, "copies": 0, "top1_agreement": 1.0, "max_abs_dp": 0.01, "median_abs_dp": 0.001,
           "worst_class": "mel", "per_class": {}}


def path(artifact: str, decode: str, ms: float, passed: bool = True, precision: str = "f32",
         top1: float = 1.0) -> ServedPath:
    runtime = "openvino" if artifact.startswith("openvino") else "onnxruntime"
    figures = {**FIGURES, "top1_agreement": top1, "max_abs_dp": 0.01 if passed else 0.158}
    return ServedPath(artifact, runtime, decode, precision, passed, 0.02, ms, figures)


PATHS = [
    path("openvino-int8", "fast", 30.0, passed=False, top1=0.925),
    path("openvino-int8", "exact", 95.0, passed=False, top1=0.95),
    path("openvino-fp32", "fast", 60.0, passed=False, top1=0.975),
    path("openvino-fp32", "exact", 120.0),
    path("openvino-fp32", "fast", 40.0, precision="bf16", passed=False, top1=0.9),
    path("openvino-fp32", "exact", 100.0, precision="bf16"),
    path("onnx-fp32", "fast", 70.0),
    path("onnx-fp32", "exact", 130.0),
]


def choose(wanted: Wanted) -> ServedPath:
    return choose_path(PATHS, wanted, rank={}, source="models/clinic/1").path


def refusal(paths: list[ServedPath], wanted: Wanted, source: str = "models/clinic/1") -> str:
    """The ModelError message choosing among `paths` for `wanted` raises."""
    with pytest.raises(ModelError) as caught:
        choose_path(paths, wanted, rank={}, source=source)
    return str(caught.value)


def test_auto_serves_the_fastest_path_that_met_the_bar() -> None:
    assert choose(Wanted("openvino", "f32")).key == "openvino-fp32/exact"
    assert choose(Wanted("openvino", "bf16")).key == "openvino-fp32@bf16/exact"
    assert choose(Wanted("onnxruntime", "f32")).key == "onnx-fp32/fast"
    assert choose(Wanted("onnxruntime", "f32", decode="exact")).key == "onnx-fp32/exact"


def test_the_reason_gives_the_measurement() -> None:
    choice = choose_path(PATHS, Wanted("openvino", "f32"), rank={}, source="m")
    assert choice.reason == ("fastest of 1 path(s) that met the bar for these settings: 120 ms/img, "
                             "top-1 100.0% and max |dp| 0.01 on 40 verification photos")
    assert not choice.degraded


def test_settings_no_passing_path_allows_are_refused_naming_the_settings_that_work() -> None:
    assert refusal(PATHS, Wanted("openvino", "f32", decode="fast")) == (
        'no served path of models/clinic/1 met the bar for runtime.backend = "openvino" (f32), model.artifact = "auto", '
        'imaging.decode = "fast" (openvino-int8/fast: top-1 92.5%, max |dp| 0.158, worst class mel; '
        'openvino-fp32/fast: top-1 97.5%, max |dp| 0.158, worst class mel); these passed: set '
        'runtime.backend = "onnxruntime" (onnx-fp32/fast); or runtime.openvino.inference_precision = "bf16" and '
        'imaging.decode = "exact" (or "auto") (openvino-fp32@bf16/exact); or imaging.decode = "exact" (or "auto") '
        '(openvino-fp32/exact)'
    )


def test_a_named_artifact_that_missed_the_bar_is_served_flagged() -> None:
    choice = choose_path(PATHS, Wanted("openvino", "f32", artifact="openvino-int8"), rank={}, source="m")
    assert choice.path.key == "openvino-int8/exact"  # its best agreement
    assert choice.degraded
    assert choice.reason == ("model.artifact names openvino-int8, whose path missed the bar "
                             "(openvino-int8/exact: top-1 95.0%, max |dp| 0.158, worst class mel)")


def test_nothing_passed_names_the_convert_options() -> None:
    failing = [p for p in PATHS if not p.passed]
    assert refusal(failing, Wanted("onnxruntime", "f32"), "models/x/1") == (
        'models/x/1 has no served path for runtime.backend = "onnxruntime" (f32), model.artifact = "auto", '
        'imaging.decode = "auto", and no other path passed either: reconvert with more (or more typical) photos '
        'in --calibration-dir, or relax the bar with --min-agreement / --max-dp'
    )


def test_json_round_trip_keeps_every_figure() -> None:
    original = PATHS[5]
    assert ServedPath.from_json(original.to_json()) == original
    assert original.to_json()["inference_precision"] == "bf16"
    with pytest.raises(ValueError, match="decode 'blurry' is not one of fast, exact"):
        ServedPath.from_json({**original.to_json(), "decode": "blurry"})


def test_openvino_never_serves_a_path_measured_on_onnx_runtime() -> None:
    onnx_only = [p for p in PATHS if p.runtime == "onnxruntime"]
    assert refusal(onnx_only, Wanted("openvino", "f32"), "m") == (
        'm has no served path for runtime.backend = "openvino" (f32), model.artifact = "auto", imaging.decode = "auto"; '
        'these passed: set runtime.backend = "onnxruntime" (onnx-fp32/fast); or runtime.backend = "onnxruntime" '
        '(onnx-fp32/exact)'
    )
