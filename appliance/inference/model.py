"""A model directory made by `convert`: manifest, served-path choice, integrity, warm-up, self-check.

`load_model` is the only way a runtime gets a model: it refuses (ModelError,
one line naming the fix) a missing or tampered file, a shape or label
mismatch, settings no measured path that met the bar allows, and a model
whose golden images, decoded as serving will decode them, do not reproduce
PyTorch's answers.
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
from .paths import Choice, ServedPath, Wanted, choose_path, legacy_paths
from .runtimes import RUNTIMES, Runtime, create_runtime, runtime_class

log = logging.getLogger(__name__)

MANIFEST = "model.json"
# Beside the manifest: its sha256 (format 2 on), so a truncated or edited model.json is refused.
MANIFEST_DIGEST = "model.json.sha256"
FORMATS = (1, 2)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")

# For manifests of format 1, which measured no times: lower is assumed faster.
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
    golden_sha256: dict[str, str]  # golden file -> sha256 (format 2 on)
    served_paths: tuple[ServedPath, ...]
    # The graph's tensor names (the KServe v2 API speaks them).
    input_name: str = "input"
    output_name: str = "probabilities"


@dataclass
class LoadedModel:
    """A runtime with a verified, warmed-up, self-checked artifact loaded."""

    manifest: Manifest
    artifact: Artifact
    runtime: Runtime
    choice: Choice
    selfcheck_max_abs_dp: float = 0.0

    @property
    def served(self) -> ServedPath:
        """The served path: artifact, runtime, decode mode and precision."""
        return self.choice.path

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
            "decode": self.served.decode,
            "served_path": self.served.key,
            "demo": self.manifest.demo,
        }
        if self.artifact.degraded or self.choice.degraded:
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
        text = path.read_bytes()
        raw = json.loads(text)
        fmt = raw.get("format", 1)
        if fmt not in FORMATS:
            raise ModelError(f"{path}: format {fmt!r} is not one this appliance reads ({', '.join(map(str, FORMATS))}); "
                             f"upgrade the appliance or reconvert with its convert")
        if fmt >= 2:
            _check_manifest_digest(directory, text)
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
        golden_sha256 = {str(g["file"]): str(g["sha256"]) for g in raw.get("golden", []) if "sha256" in g}
        if fmt >= 2:
            served = tuple(ServedPath.from_json(p) for p in raw["served_paths"].values())
        else:
            formats = {name: runtime_class(name).formats for name in RUNTIMES}
            served = tuple(legacy_paths(artifacts.values(), formats))
        unknown = sorted({p.artifact for p in served} - set(artifacts))
        if unknown:
            raise ValueError(f"served_paths name artifacts it does not list: {', '.join(unknown)}")
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
            golden_sha256=golden_sha256,
            served_paths=served,
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


def choose(manifest: Manifest, wanted: Wanted, formats: tuple[str, ...]) -> Choice:
    """The served path for these settings (see paths.choose_path), its artifact checked to exist here."""
    if wanted.artifact != "auto":
        artifact = manifest.artifacts.get(wanted.artifact)
        if artifact is None:
            raise ModelError(
                f"model.artifact: {wanted.artifact!r} is not in {manifest.directory / MANIFEST} "
                f"(has: {', '.join(manifest.artifacts) or 'none'}); set model.artifact = \"auto\""
            )
        if artifact.format not in formats:
            raise ModelError(f"model.artifact: {wanted.artifact!r} is {artifact.format}; runtime.backend "
                             f"\"{wanted.runtime}\" loads {', '.join(formats)}")
    rank = {a.key: PRECISION_SPEED_RANK.get(a.precision, 9) * len(formats) + formats.index(a.format)
            for a in manifest.artifacts.values() if a.format in formats}
    choice = choose_path(list(manifest.served_paths), wanted, rank=rank, source=str(manifest.directory))
    if choice.degraded or manifest.artifacts[choice.path.artifact].degraded:
        log.warning("SERVING A DEGRADED PATH: %s missed its parity bar; answers are flagged", choice.path.key)
    return choice


def _check_manifest_digest(directory: Path, text: bytes) -> None:
    """model.json must match the sha256 convert wrote beside it."""
    path = directory / MANIFEST_DIGEST
    try:
        expected = path.read_text(encoding="ascii").split()[0]
    except (FileNotFoundError, IndexError, UnicodeDecodeError):
        raise ModelError(f"{path}: missing or empty; the model directory is incomplete: copy it again or reconvert") from None
    actual = hashlib.sha256(text).hexdigest()
    if actual != expected:
        raise ModelError(f"{directory / MANIFEST}: sha256 {actual[:12]}… does not match {MANIFEST_DIGEST}'s "
                         f"{expected[:12]}…; the manifest was changed after convert wrote it: copy it again or reconvert")


def verify_files(directory: Path, files: dict[str, str], what: str) -> None:
    """Check every file (relative path -> sha256) against the manifest's sha256."""
    for relative, expected in files.items():
        path = directory / relative
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise ModelError(f"{path}: missing ({what})") from None
        if actual != expected:
            raise ModelError(f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(path: Path, wanted: Wanted, runtime_config: Any, *, max_batch: int) -> LoadedModel:
    """Resolve, verify, choose the served path, load, warm up and self-check; raise ModelError on any failure."""
    directory = resolve_model_dir(path)
    manifest = read_manifest(directory)
    runtime = create_runtime(wanted.runtime, runtime_config)
    choice = choose(manifest, wanted, type(runtime).formats)
    artifact = manifest.artifacts[choice.path.artifact]
    verify_files(directory, artifact.files, f"artifact {artifact.key}")
    verify_files(directory, manifest.golden_sha256, "golden image")
    runtime.load(directory / artifact.file)
    model = LoadedModel(manifest, artifact, runtime, choice)
    try:
        warm_up(model, max_batch)
        model.selfcheck_max_abs_dp = self_check(model, max_batch)
    except BaseException:
        runtime.close()
        raise
    log.info("model %s v%s serves %s on %s (%s); self-check max |dp| %.2g", manifest.name, manifest.version,
             choice.path.key, runtime.describe()["device"], choice.reason, model.selfcheck_max_abs_dp)
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
    """Run the golden images through the served path (its decode mode, this runtime); return the worst |Δp|.

    Against PyTorch's answers, within the tolerance convert measured for this path
    plus its margin. In batches no larger than serving uses, so the runtime's memory
    arena never grows beyond what serving needs (ONNX Runtime keeps it for the
    process's life).
    """
    manifest, served = model.manifest, model.served
    if not manifest.golden:
        raise ModelError(f"{manifest.directory / MANIFEST}: no golden images; the self-check cannot run")
    tensors = []
    for file, _ in manifest.golden:
        data = (manifest.directory / file).read_bytes()
        tensors.append(imaging.decode(data, manifest.preprocessing, max_pixels=1 << 40, mode=served.decode).tensor)
    answers = np.concatenate([model.runtime.infer(np.stack(tensors[i : i + max_batch]))
                              for i in range(0, len(tensors), max_batch)])
    worst = 0.0
    limit = served.selfcheck_max_abs_dp
    for (file, expected), got in zip(manifest.golden, answers):
        expected_arr = np.asarray(expected, dtype=np.float64)
        delta = float(np.max(np.abs(got.astype(np.float64) - expected_arr)))
        worst = max(worst, delta)
        top_expected, top_got = int(np.argmax(expected_arr)), int(np.argmax(got))
        if top_expected != top_got or delta > limit:
            others = [p for p in manifest.served_paths if p.passed and p.runtime == served.runtime and p.key != served.key]
            fix = (f"serve another path that passed ({', '.join(p.key for p in others[:3])}) with model.artifact / "
                   f"imaging.decode, or reconvert on this machine" if others else "reconvert on this machine")
            raise ModelError(
                f"self-check failed for {served.key} on {file}: max |dp| {delta:.3g} "
                f"(allowed {limit:.3g}), top-1 {manifest.labels[top_got]} vs PyTorch's "
                f"{manifest.labels[top_expected]}; refusing to serve: {fix}"
            )
    return worst
