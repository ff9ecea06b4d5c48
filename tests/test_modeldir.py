"""The model directory's one reader and one writer: what convert writes, the appliance reads back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import ModelError
from appliance.modeldir import (
    MANIFEST,
    MANIFEST_DIGEST,
    Artifact,
    GoldenImage,
    Manifest,
    Preprocessing,
    ServedPath,
    digest_matches,
    input_shape,
    read_manifest,
    sha256_file,
    write_manifest,
)


def no_legacy(artifacts: object) -> list[ServedPath]:
    raise AssertionError("a format 2 manifest names its own served paths")


def written(directory: Path) -> Manifest:
    """A small format 2 manifest written to `directory`, as convert writes one."""
    (directory / "model.onnx").write_bytes(b"graph")
    (directory / "0.jpg").write_bytes(b"jpeg")
    figures = {"images": 30, "copies": 0, "top1_agreement": 1.0, "max_abs_dp": 0.01}
    manifest = Manifest(
        directory=directory, name="clinic", version="3", demo=False, labels=("mel", "nv"),
        input_shape=input_shape(Preprocessing()), preprocessing=Preprocessing(), created_at="2026-01-01T00:00:00Z",
        source={"file": "model.pt"},
        artifacts={"onnx-fp32": Artifact.hashed("onnx-fp32", directory, "onnx", "fp32", [directory / "model.onnx"],
                                                details={"parity": {"passed": True}, "opset": 17})},
        golden=(GoldenImage("0.jpg", (0.9, 0.1), sha256_file(directory / "0.jpg")),),
        served_paths=(ServedPath("onnx-fp32", "onnxruntime", "exact", "f32", True, 0.02, 12.5, figures),),
        verification={"photos": 30, "source": "held-out"},
    )
    write_manifest(manifest)
    return manifest


def test_what_is_written_reads_back_equal(tmp_path: Path) -> None:
    manifest = written(tmp_path)
    assert read_manifest(tmp_path, no_legacy) == manifest
    document = json.loads((tmp_path / MANIFEST).read_text())
    assert document["version"] == 3 and document["format"] == 2
    assert list(document) == ["format", "name", "version", "demo", "created_at", "labels", "input", "output",
                              "preprocessing", "source", "artifacts", "served_paths", "verification", "golden"]
    assert document["artifacts"]["onnx-fp32"]["sha256"] == sha256_file(tmp_path / "model.onnx")
    assert document["output"] == {"name": "probabilities", "shape": [-1, 2], "dtype": "float32"}
    assert digest_matches((tmp_path / MANIFEST).read_bytes(), (tmp_path / MANIFEST_DIGEST).read_bytes())


def test_an_unknown_format_is_refused_on_read(tmp_path: Path) -> None:
    written(tmp_path)
    document = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**document, "format": 9}))
    with pytest.raises(ModelError, match="format 9 is not one this appliance reads"):
        read_manifest(tmp_path, no_legacy)


def test_the_preprocessing_table_reads_back_as_written() -> None:
    spec = Preprocessing()
    assert spec.to_json()["mean"] == [0.485, 0.456, 0.406]
    assert Preprocessing.from_manifest(spec.to_json()) == spec
