"""Serving a model directory made by `convert`: served-path choice, integrity, warm-up, self-check.

`load_model` is the only way a runtime gets a model: it refuses (ModelError,
one line naming the fix) a missing or tampered file, a shape or label
mismatch, settings no measured path that met the bar allows, and a model
whose golden images, decoded as serving will decode them, do not reproduce
PyTorch's answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import imaging, modeldir
from ..errors import ModelError
# Manifest is re-exported: the API layer names the served model's manifest from here.
from ..modeldir import MANIFEST, Artifact, Manifest as Manifest, ServedPath, verify_files
from .paths import Choice, Wanted, choose_path, legacy_paths
from .proof import Proof, find_proof, fingerprint, reference_path
from .runtimes import RUNTIMES, Runtime, create_runtime, runtime_class
from .timing import measured_choice, timings_file

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin")

# For manifests of format 1, which measured no times: lower is assumed faster.
PRECISION_SPEED_RANK = {"int8": 0, "fp16": 1, "bf16": 1, "fp32": 2}


@dataclass
class LoadedModel:
    """A runtime with a verified, warmed-up, self-checked artifact loaded."""

    manifest: Manifest
    artifact: Artifact
    runtime: Runtime
    choice: Choice
    selfcheck_max_abs_dp: float = 0.0
    proof: Proof = Proof("off", "not asked")  # this machine's proof of the served paths (inference/proof.py)
    on_reference: bool = False  # loaded on the reference path by the live parity watch's fallback

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
        if self.artifact.degraded or self.choice.degraded or self.proof.failed_here(self.served):
            info["degraded"] = True
        return info


def resolve_model_dir(path: Path, pin_version: str = "") -> Path:
    """The version directory to serve: `path` itself, or its version `pin_version`, else its highest numbered one."""
    if path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES or path.name.endswith(".pth.tar"):
            raise ModelError(
                f"model.path points at a PyTorch checkpoint ({path}); convert it first: "
                f"python -m convert {path} --name {_suggest_name(path)} --out models "
                f"--calibration-dir PHOTOS, then set model.path (MODEL_PATH) to models/{_suggest_name(path)}"
            )
        raise ModelError(f"model.path: {path} is a file; expected a model directory made by convert")
    if (path / MANIFEST).is_file():
        if pin_version:
            raise ModelError(f"model.pin_version: {pin_version!r} needs model.path to be a model's directory "
                             f"(holding numbered versions); {path} is one version: set model.path to {path.parent}")
        return path
    if not path.is_dir():
        raise ModelError(f"model.path: {path} does not exist (build the demo with: python -m convert demo)")
    versions = model_versions(path)
    if pin_version:
        if pin_version not in {p.name for p in versions}:
            raise ModelError(f"model.pin_version: {pin_version!r} is not a version in {path} "
                             f"(has: {', '.join(p.name for p in versions) or 'none'})")
        return path / pin_version
    if not versions:
        raise ModelError(f"model.path: {path} holds no {MANIFEST} and no numbered version directory with one")
    return versions[-1]


def model_versions(path: Path) -> list[Path]:
    """The numbered version directories of a model's directory that hold a manifest, lowest first."""
    found = [p for p in path.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file()] if path.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def _suggest_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem) or "model"


def read_manifest(directory: Path, trusted_keys: tuple[Path, ...] = ()) -> Manifest:
    """Parse and sanity-check `model.json` (see modeldir.read_manifest), signed by one of `trusted_keys` when given.

    Format 1's served paths come from the runtime registry.
    """
    def legacy(artifacts: Iterable[Artifact]) -> list[ServedPath]:
        # Only a format 1 manifest asks, so only then are the runtime classes imported.
        return legacy_paths(artifacts, {name: runtime_class(name).formats for name in RUNTIMES})

    manifest = modeldir.read_manifest(directory, legacy, trusted_keys)
    if manifest.format < 2:
        log.warning("%s is format 1: neither it nor its golden images are covered by a hash; reconvert to get "
                    "format 2", directory / MANIFEST)
    return manifest


def choose(manifest: Manifest, wanted: Wanted, formats: tuple[str, ...],
           paths: Iterable[ServedPath] | None = None) -> Choice:
    """The served path for these settings (see paths.choose_path) among `paths` (the manifest's, as this machine
    may serve them: proof.Proof.apply), its artifact checked to exist here."""
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
    served = list(manifest.served_paths if paths is None else paths)
    choice = choose_path(served, wanted, rank=rank, source=str(manifest.directory))
    if choice.degraded or manifest.artifacts[choice.path.artifact].degraded:
        log.warning("SERVING A DEGRADED PATH: %s missed its parity bar; answers are flagged", choice.path.key)
    return choice


def load_model(
    path: Path, wanted: Wanted, runtime_config: Any, *, max_batch: int, trusted_keys: tuple[Path, ...] = (),
    pin_version: str = "", measure_in: Path | None = None, prove_in: Path | None = None, reference: bool = False,
) -> LoadedModel:
    """Resolve (`pin_version` or the highest), verify (signature by one of `trusted_keys` when given), choose the
    served path (among those proven on this machine, the proof cached in `prove_in`, when given; by timing them on
    this machine, cached in `measure_in`, when given), load, warm up and self-check; raise ModelError on any failure.

    A version not yet proven here is served on an FP32 path, its proof pending (`LoadedModel.proof`): the
    lifecycle proves it and loads it again. With `reference`, the reference path is served (FP32 decoded whole,
    proof.reference_path): the live parity watch's fallback.
    """
    directory = resolve_model_dir(path, pin_version)
    manifest = read_manifest(directory, trusted_keys)
    if reference:
        ref = reference_path(manifest, wanted.runtime)
        if ref is None:
            raise ModelError(f"{directory}: no FP32 path decoded whole passed on {wanted.runtime}: no reference path "
                             f"to fall back to")
        wanted = dataclasses.replace(wanted, artifact=ref.artifact, decode="exact")
    runtime = create_runtime(wanted.runtime, runtime_config)
    formats = type(runtime).formats
    # Every path these settings allow that passed at convert: what a proof runs, and what `auto` picks among.
    allowed = [p for p in manifest.served_paths
               if p.passed and wanted.allows(p) and manifest.artifacts[p.artifact].format in formats]
    proof = find_proof(manifest, allowed, fingerprint(runtime, runtime_config), prove_in)
    paths = proof.apply(manifest.served_paths, manifest, named=wanted.artifact != "auto")
    choice = choose(manifest, wanted, formats, paths)
    if proof.state == "pending" and manifest.artifacts[choice.path.artifact].precision == "fp32" and wanted.artifact == "auto":
        choice = dataclasses.replace(choice, reason=f"safe first: {proof.reason} ({choice.reason})")
    elif proof.state == "proven" and not choice.degraded:
        choice = dataclasses.replace(choice, reason=f"{choice.reason}; {proof.reason}")
    verify_files(directory, manifest.golden_sha256, "golden image")
    candidates = [p for p in paths if p.passed and wanted.allows(p) and manifest.artifacts[p.artifact].format in formats]
    if measure_in is not None and not choice.degraded and len(candidates) > 1:
        for artifact_key in sorted({p.artifact for p in candidates}):  # nothing unverified runs, timed or served
            verify_files(directory, manifest.artifacts[artifact_key].files, f"artifact {artifact_key}")
        cache = timings_file(measure_in, manifest, wanted.runtime, wanted.precision, runtime.describe()["device"])
        choice = measured_choice(manifest, candidates, lambda: create_runtime(wanted.runtime, runtime_config), cache)
    artifact = manifest.artifacts[choice.path.artifact]
    verify_files(directory, artifact.files, f"artifact {artifact.key}")
    runtime.load(directory / artifact.file)
    if reference:
        choice = dataclasses.replace(choice, reason=f"the reference path, after the live parity watch fell back "
                                                    f"({choice.reason})")
    model = LoadedModel(manifest, artifact, runtime, choice, proof=proof, on_reference=reference)
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
    for image in manifest.golden:
        path = manifest.directory / image.file
        data = path.read_bytes()
        # Checked again on the bytes used: the file could have changed since load_model hashed it.
        if image.sha256 is not None and hashlib.sha256(data).hexdigest() != image.sha256:
            raise ModelError(f"{path}: sha256 does not match the manifest's {image.sha256[:12]}… (golden image)")
        tensors.append(imaging.decode(data, manifest.preprocessing, max_pixels=1 << 40, mode=served.decode).tensor)
    answers = np.concatenate([model.runtime.infer(np.stack(tensors[i : i + max_batch]))
                              for i in range(0, len(tensors), max_batch)])
    worst = 0.0
    limit = served.selfcheck_max_abs_dp
    for image, got in zip(manifest.golden, answers, strict=True):
        file, expected_arr = image.file, np.asarray(image.probabilities, dtype=np.float64)
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
