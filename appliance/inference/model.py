"""A model directory made by `convert`: manifest, artifact choice, integrity, warm-up, self-check.

`load_model` is the only way a runtime gets a model: it refuses (ModelError,
one line) a missing or tampered artifact, a shape or label mismatch, and a
model whose golden images do not reproduce PyTorch's answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import imaging
from ..errors import ModelError
from .runtimes import Runtime, create_runtime

log = logging.getLogger(__name__)

MANIFEST = "model.json"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")

# Lower is faster; "auto" picks the fastest artifact whose parity passed.
PRECISION_SPEED_RANK = {"int8": 0, "fp16": 1, "bf16": 1, "fp32": 2}


@dataclass(frozen=True)
class Artifact:
    """One servable file set of a model version (e.g. `onnx-int8`)."""

    key: str
    format: str
    precision: str
    file: str
    files: dict[str, str]  # relative path -> sha256
    degraded: bool
    selfcheck_max_abs_dp: float


@dataclass(frozen=True)
class Manifest:
    """The parts of `model.json` the server relies on."""

    directory: Path
    name: str
    version: str
    demo: bool
    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    preprocessing: imaging.Preprocessing
    artifacts: dict[str, Artifact]
    golden: tuple[tuple[str, tuple[float, ...]], ...]
    # The graph's tensor names (the KServe v2 API speaks them).
    input_name: str = "input"
    output_name: str = "probabilities"


@dataclass
class LoadedModel:
    """A runtime with a verified, warmed-up, self-checked artifact loaded."""

    manifest: Manifest
    artifact: Artifact
    runtime: Runtime
    selfcheck_max_abs_dp: float = 0.0

    def describe(self) -> dict[str, Any]:
        """The `model` field of every answer."""
        running = self.runtime.describe()
        info = {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "artifact": self.artifact.key,
            "precision": self.artifact.precision,
            "runtime": running["runtime"],
            "device": running["device"],
            "demo": self.manifest.demo,
        }
        if self.artifact.degraded:
            info["degraded"] = True
        return info


def resolve_model_dir(path: Path) -> Path:
    """The version directory to serve: `path` itself, or its highest numbered version."""
    if path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES or path.name.endswith(".pth.tar"):
            raise ModelError(
                f"model.path points at a PyTorch checkpoint ({path}); convert it first: "
                f"python -m convert {path} --name {_suggest_name(path)} --out models "
                f"--calibration-dir PHOTOS, then set model.path (MODEL_PATH) to models/{_suggest_name(path)}"
            )
        raise ModelError(f"model.path: {path} is a file; expected a model directory made by convert")
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise ModelError(f"model.path: {path} does not exist (build the demo with: python -m convert demo)")
    versions = [p for p in path.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file()]
    if not versions:
        raise ModelError(f"model.path: {path} holds no {MANIFEST} and no numbered version directory with one")
    return max(versions, key=lambda p: int(p.name))


def _suggest_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem) or "model"


def read_manifest(directory: Path) -> Manifest:
    """Parse and sanity-check `model.json`."""
    path = directory / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        labels = tuple(str(label) for label in raw["labels"])
        artifacts = {
            key: Artifact(
                key=key,
                format=str(a["format"]),
                precision=str(a["precision"]),
                file=str(a["file"]),
                files={str(k): str(v) for k, v in a.get("files", {a["file"]: a["sha256"]}).items()},
                degraded=bool(a.get("degraded", False)),
                selfcheck_max_abs_dp=float(a.get("selfcheck_max_abs_dp", 0.01)),
            )
            for key, a in raw["artifacts"].items()
        }
        golden = tuple((str(g["file"]), tuple(float(p) for p in g["probabilities"])) for g in raw.get("golden", []))
        manifest = Manifest(
            directory=directory,
            name=str(raw["name"]),
            version=str(raw["version"]),
            demo=bool(raw.get("demo", False)),
            labels=labels,
            input_shape=tuple(int(d) for d in raw["input"]["shape"]),
            preprocessing=imaging.Preprocessing.from_manifest(raw.get("preprocessing", {})),
            artifacts=artifacts,
            golden=golden,
            input_name=str(raw["input"].get("name", "input")),
            output_name=str(raw.get("output", {}).get("name", "probabilities")),
        )
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a valid manifest ({type(exc).__name__}: {exc})") from None
    crop = manifest.preprocessing.crop
    if manifest.input_shape[1:] != (3, crop, crop):
        raise ModelError(f"{path}: input shape {list(manifest.input_shape)} does not match the {crop}x{crop} crop")
    for file, probabilities in golden:
        if len(probabilities) != len(labels):
            raise ModelError(f"{path}: golden {file} has {len(probabilities)} probabilities for {len(labels)} labels")
    return manifest


def choose_artifact(manifest: Manifest, formats: tuple[str, ...], requested: str) -> Artifact:
    """The named artifact, or for "auto" the fastest non-degraded one this runtime can load."""
    if requested != "auto":
        artifact = manifest.artifacts.get(requested)
        if artifact is None:
            raise ModelError(
                f"model.artifact: {requested!r} is not in {manifest.directory / MANIFEST} "
                f"(has: {', '.join(manifest.artifacts) or 'none'})"
            )
        if artifact.format not in formats:
            raise ModelError(f"model.artifact: {requested!r} is {artifact.format}; this runtime loads {', '.join(formats)}")
        if artifact.degraded:
            log.warning("SERVING A DEGRADED ARTIFACT: %s missed its parity bar; answers are flagged", requested)
        return artifact
    candidates = [a for a in manifest.artifacts.values() if a.format in formats and not a.degraded]
    if not candidates:
        raise ModelError(
            f"{manifest.directory / MANIFEST}: no artifact that passed parity can run on this runtime "
            f"(loads {', '.join(formats)})"
        )
    return min(candidates, key=lambda a: (PRECISION_SPEED_RANK.get(a.precision, 9), formats.index(a.format)))


def verify_files(directory: Path, artifact: Artifact) -> None:
    """Check every file of the artifact against the manifest's sha256."""
    for relative, expected in artifact.files.items():
        path = directory / relative
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise ModelError(f"{path}: missing (artifact {artifact.key})") from None
        if actual != expected:
            raise ModelError(f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: Path, requested: str, runtime_name: str, runtime_config: Any, *, max_batch: int) -> LoadedModel:
    """Resolve, verify, load, warm up and self-check; raise ModelError on any failure."""
    directory = resolve_model_dir(path)
    manifest = read_manifest(directory)
    runtime = create_runtime(runtime_name, runtime_config)
    artifact = choose_artifact(manifest, type(runtime).formats, requested)
    verify_files(directory, artifact)
    runtime.load(directory / artifact.file)
    model = LoadedModel(manifest, artifact, runtime)
    try:
        warm_up(model, max_batch)
        model.selfcheck_max_abs_dp = self_check(model, max_batch)
    except BaseException:
        runtime.close()
        raise
    log.info("model %s v%s (%s) ready on %s; self-check max |dp| %.2g",
             manifest.name, manifest.version, artifact.key, runtime.describe()["device"], model.selfcheck_max_abs_dp)
    return model


def warm_up(model: LoadedModel, max_batch: int) -> None:
    """Run every batch size once before serving.

    The first inference of each shape pays for memory planning and kernel
    selection (hundreds of ms, seconds on a GPU); doing it here keeps that
    out of the first clinician's request and inside systemd's start timeout.
    It also proves the output shape matches the labels.
    """
    crop = model.manifest.preprocessing.crop
    classes = len(model.manifest.labels)
    for n in sorted({1, max_batch}):
        out = model.runtime.infer(np.zeros((n, 3, crop, crop), dtype=np.float32))
        if out.shape != (n, classes):
            raise ModelError(
                f"{model.artifact.file}: output shape {list(out.shape)} for a batch of {n}; "
                f"expected [{n}, {classes}] for labels {', '.join(model.manifest.labels)}"
            )


def self_check(model: LoadedModel, max_batch: int) -> float:
    """Run the golden images through our own decode + runtime path; return the worst |Δp|.

    In batches no larger than serving uses, so the runtime's memory arena never
    grows beyond what serving needs (ONNX Runtime keeps it for the process's life).
    """
    manifest = model.manifest
    if not manifest.golden:
        raise ModelError(f"{manifest.directory / MANIFEST}: no golden images; the self-check cannot run")
    tensors = []
    for file, _ in manifest.golden:
        data = (manifest.directory / file).read_bytes()
        tensors.append(imaging.decode(data, manifest.preprocessing, max_pixels=1 << 40).tensor)
    answers = np.concatenate([model.runtime.infer(np.stack(tensors[i : i + max_batch]))
                              for i in range(0, len(tensors), max_batch)])
    worst = 0.0
    limit = model.artifact.selfcheck_max_abs_dp
    for (file, expected), got in zip(manifest.golden, answers):
        expected_arr = np.asarray(expected, dtype=np.float64)
        delta = float(np.max(np.abs(got.astype(np.float64) - expected_arr)))
        worst = max(worst, delta)
        top_expected, top_got = int(np.argmax(expected_arr)), int(np.argmax(got))
        if top_expected != top_got or delta > limit:
            raise ModelError(
                f"self-check failed for {model.artifact.key} on {file}: max |dp| {delta:.3g} "
                f"(allowed {limit:.3g}), top-1 {manifest.labels[top_got]} vs PyTorch's "
                f"{manifest.labels[top_expected]}; refusing to serve"
            )
    return worst
