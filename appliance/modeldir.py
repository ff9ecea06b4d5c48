"""The model directory `convert` writes and the appliance serves: model.json and its digest, hashes, preprocessing.

Both packages go through here, so the on-disk format (models/README.md) has one
reader and one writer. Nothing here imports torch, a runtime or the imaging code:
the appliance must not pull in torch, and convert must run offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Literal, cast

from .errors import ModelError

MANIFEST = "model.json"
# Beside the manifest: its sha256 (format 2 on), so a truncated or edited model.json is refused.
MANIFEST_DIGEST = "model.json.sha256"
# Beside those, optional: an Ed25519 signature over model.json's sha256 (`convert --sign-key`),
# required when `model.trusted_keys` is set. Base64 of the 64-byte signature, one line.
SIGNATURE = "model.json.sig"
# What is signed: this prefix and the hex sha256 of model.json's bytes (the prefix keeps a
# signature made for this purpose from meaning anything elsewhere).
SIGNED_PREFIX = b"derm-appliance model.json sha256 "
# 2: served_paths, verification, golden sha256 and model.json.sha256. convert writes FORMAT;
# the appliance reads every one of FORMATS.
FORMAT = 2
FORMATS = (1, 2)

# The reference preprocessing (what training used): torchvision Resize, CenterCrop, Normalize.
RESIZE_SHORTER = 256
CROP = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The graph's tensor names (the KServe v2 API speaks them).
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"

# What a version's verification set holds (model.json's verification.set_form): the photos as taken, or the
# reference preprocessing's 8-bit crops (PNG) for a clinic that keeps its whole photos on the converting machine.
VERIFICATION_FORMS = ("photos", "crops")
# How the server decodes a photo for a served path: imaging's DCT-scaled "fast" decode or its whole "exact" one.
DecodeMode = Literal["fast", "exact"]
DECODE_MODES: tuple[DecodeMode, ...] = ("fast", "exact")
# The runtime a format's artifacts are measured (and served) on.
RUNTIME_OF_FORMAT = {"onnx": "onnxruntime", "openvino": "openvino"}


def import_openvino() -> Any:
    """`import openvino`, with its usage telemetry off; every import of it should go through here.

    Importing openvino also imports its model converter, which writes a client id under
    ~/intel at once and reports each conversion to Google Analytics unless the user opted
    out (openvino-telemetry: a missing consent file counts as consent). Neither the
    appliance nor `convert` reports anything to anyone: with openvino_telemetry made
    unimportable, OpenVINO falls back to its own no-op stub.
    """
    # None: `import` raises ImportError (the import system's documented block); typeshed
    # types sys.modules as modules only, hence the cast.
    sys.modules.setdefault("openvino_telemetry", cast(ModuleType, None))
    import openvino

    return openvino


@dataclass(frozen=True)
class Preprocessing:
    """The model's preprocessing, as the manifest's `preprocessing` table states it."""

    resize_shorter: int = RESIZE_SHORTER
    crop: int = CROP
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @classmethod
    def from_manifest(cls, table: dict) -> Preprocessing:
        """Build from a manifest's `preprocessing` table (unknown keys ignored)."""
        if not isinstance(table, dict):
            raise ModelError(f"preprocessing: expected a table; got {table!r}")
        sizes: dict[str, int] = {}
        for key in ("resize_shorter", "crop"):
            value = table.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"preprocessing.{key}: expected a positive integer; got {value!r}")
            sizes[key] = value
        if sizes["crop"] > sizes["resize_shorter"]:
            raise ModelError(
                f"preprocessing.crop: expected at most resize_shorter ({sizes['resize_shorter']}); got {sizes['crop']}"
            )
        triples: dict[str, tuple[float, float, float]] = {}
        for key in ("mean", "std"):
            value = table.get(key)
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or (key == "std" and not all(v > 0 for v in value))
            ):
                wanted = "3 positive numbers" if key == "std" else "3 numbers"
                raise ModelError(f"preprocessing.{key}: expected {wanted}; got {value!r}")
            triples[key] = (float(value[0]), float(value[1]), float(value[2]))
        return cls(sizes["resize_shorter"], sizes["crop"], triples["mean"], triples["std"])

    def to_json(self) -> dict[str, Any]:
        """The manifest's `preprocessing` table (color, interpolation and scale are what imaging always does)."""
        return {
            "color": "RGB",
            "resize_shorter": self.resize_shorter,
            "interpolation": "bilinear-antialias",
            "crop": self.crop,
            "scale": 1 / 255,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class ServedPath:
    """One way of answering: artifact + runtime + decode mode + inference precision, and its figures."""

    artifact: str
    runtime: str
    decode: DecodeMode
    inference_precision: str  # the runtime's inference precision: "f32" or "bf16"
    passed: bool
    selfcheck_max_abs_dp: float
    ms_per_image: float | None = None  # decode + inference, batch 1, as convert measured it
    figures: Mapping[str, Any] = field(default_factory=dict)  # verification figures, as convert wrote them

    @property
    def key(self) -> str:
        """`openvino-int8/fast`, `openvino-fp32@bf16/exact`."""
        precision = "" if self.inference_precision == "f32" else f"@{self.inference_precision}"
        return f"{self.artifact}{precision}/{self.decode}"

    def summary(self) -> str:
        """Its verification figures in a few words (for logs and refusals)."""
        f = self.figures
        if "top1_agreement" not in f:
            return self.key
        return (f"{self.key}: top-1 {f['top1_agreement']:.1%}, max |dp| {f['max_abs_dp']:.3g}"
                f"{', worst class ' + str(f['worst_class']) if f.get('worst_class') else ''}")

    def to_json(self) -> dict[str, Any]:
        """The `served_paths.<key>` table of model.json."""
        return {
            "artifact": self.artifact, "runtime": self.runtime, "decode": self.decode,
            "inference_precision": self.inference_precision,
            "passed": self.passed, "ms_per_image": self.ms_per_image,
            "selfcheck_max_abs_dp": self.selfcheck_max_abs_dp, **self.figures,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ServedPath:
        """Parse one `served_paths` table; KeyError/ValueError/TypeError on a bad one."""
        decode = next((mode for mode in DECODE_MODES if mode == raw["decode"]), None)
        if decode is None:
            raise ValueError(f"decode {raw['decode']!r} is not one of {', '.join(DECODE_MODES)}")
        ms = raw.get("ms_per_image")
        own = {"artifact", "runtime", "decode", "inference_precision", "passed", "ms_per_image", "selfcheck_max_abs_dp"}
        return cls(
            artifact=str(raw["artifact"]), runtime=str(raw["runtime"]), decode=decode,
            inference_precision=str(raw["inference_precision"]), passed=bool(raw["passed"]),
            selfcheck_max_abs_dp=float(raw["selfcheck_max_abs_dp"]),
            ms_per_image=None if ms is None else float(ms),
            figures={k: v for k, v in raw.items() if k not in own},
        )


@dataclass(frozen=True)
class Artifact:
    """One servable file set of a model version (e.g. `onnx-int8`): `file` is the one a runtime loads."""

    key: str
    format: str
    precision: str
    file: str
    files: dict[str, str]  # relative path -> sha256, `file` included
    degraded: bool = False
    selfcheck_max_abs_dp: float = 0.01
    details: Mapping[str, Any] = field(default_factory=dict)  # convert's figures (parity, opset, calibration), as written

    @classmethod
    def hashed(cls, key: str, directory: Path, fmt: str, precision: str, files: list[Path], **fields: Any) -> Artifact:
        """An artifact of the files written under `directory`, the main one first, each hashed now."""
        return cls(key, fmt, precision, files[0].relative_to(directory).as_posix(), file_hashes(directory, files), **fields)

    def to_json(self) -> dict[str, Any]:
        """The `artifacts.<key>` table of model.json."""
        return {"format": self.format, "precision": self.precision, "file": self.file, "sha256": self.files[self.file],
                "files": self.files, "degraded": self.degraded, "selfcheck_max_abs_dp": self.selfcheck_max_abs_dp,
                **self.details}

    @classmethod
    def from_json(cls, key: str, raw: Mapping[str, Any]) -> Artifact:
        """Parse one `artifacts` table; KeyError/ValueError/TypeError on a bad one."""
        own = {"format", "precision", "file", "sha256", "files", "degraded", "selfcheck_max_abs_dp"}
        return cls(
            key=key,
            format=str(raw["format"]),
            precision=str(raw["precision"]),
            file=str(raw["file"]),
            files={str(k): str(v) for k, v in raw.get("files", {raw["file"]: raw["sha256"]}).items()},
            degraded=bool(raw.get("degraded", False)),
            selfcheck_max_abs_dp=float(raw.get("selfcheck_max_abs_dp", 0.01)),
            details={k: v for k, v in raw.items() if k not in own},
        )


@dataclass(frozen=True)
class GoldenImage:
    """An encoded image with PyTorch FP32's probabilities: a golden image (the self-check at every start) or a
    verification photo (the proof of each path on a new machine, inference/proof.py)."""

    file: str
    probabilities: tuple[float, ...]
    sha256: str | None = None  # format 2 on

    def to_json(self) -> dict[str, Any]:
        """One entry of model.json's `golden` list."""
        return {"file": self.file, "sha256": self.sha256, "probabilities": list(self.probabilities)}


@dataclass(frozen=True)
class Manifest:
    """`model.json`: what convert wrote and the server relies on."""

    directory: Path
    name: str
    version: str
    demo: bool
    labels: tuple[str, ...]
    input_shape: tuple[int, ...]
    preprocessing: Preprocessing
    artifacts: dict[str, Artifact]
    golden: tuple[GoldenImage, ...]
    served_paths: tuple[ServedPath, ...]
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    format: int = FORMAT
    created_at: str = ""
    source: Mapping[str, Any] = field(default_factory=dict)  # the checkpoint it came from
    verification: Mapping[str, Any] = field(default_factory=dict)  # the photos the served paths were measured on
    # Its `set`: the verification photos as taken, with PyTorch's probabilities; a box proves its paths on them.
    verification_set: tuple[GoldenImage, ...] = ()

    @property
    def golden_sha256(self) -> dict[str, str]:
        """Golden file -> sha256, for the golden images that have one (format 2 on)."""
        return {g.file: g.sha256 for g in self.golden if g.sha256 is not None}

    def to_json(self) -> dict[str, Any]:
        """The whole document, in the order models/README.md shows it."""
        return {
            "format": self.format,
            "name": self.name,
            # convert numbers versions; the appliance reports them as text, as it reads every manifest.
            "version": int(self.version) if self.version.isdigit() else self.version,
            "demo": self.demo,
            "created_at": self.created_at,
            "labels": list(self.labels),
            "input": {"name": self.input_name, "shape": list(self.input_shape), "dtype": "float32", "layout": "NCHW"},
            "output": {"name": self.output_name, "shape": [-1, len(self.labels)], "dtype": "float32"},
            "preprocessing": self.preprocessing.to_json(),
            "source": dict(self.source),
            "artifacts": {key: a.to_json() for key, a in self.artifacts.items()},
            "served_paths": {p.key: p.to_json() for p in self.served_paths},
            "verification": {**self.verification,
                             **({"set": [p.to_json() for p in self.verification_set]} if self.verification_set else {})},
            "golden": [g.to_json() for g in self.golden],
        }


def now() -> str:
    """A manifest's `created_at`: UTC, to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def input_shape(preprocessing: Preprocessing) -> tuple[int, ...]:
    """The graph's input shape for this preprocessing: any batch of RGB crops."""
    return (-1, 3, preprocessing.crop, preprocessing.crop)


def write_manifest(manifest: Manifest) -> None:
    """Write model.json into the manifest's directory and, beside it, its sha256 (checked before it is read)."""
    path = manifest.directory / MANIFEST
    write_json(path, manifest.to_json())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (manifest.directory / MANIFEST_DIGEST).write_text(f"{digest}  {MANIFEST}\n", encoding="ascii")


def digest_matches(manifest_bytes: bytes, digest_text: bytes) -> bool:
    """Whether model.json.sha256's first word is the sha256 of these model.json bytes."""
    return digest_text.split()[:1] == [hashlib.sha256(manifest_bytes).hexdigest().encode()]


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write JSON with a trailing newline, keys in insertion order."""
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def read_manifest(
    directory: Path,
    legacy_paths: Callable[[Iterable[Artifact]], list[ServedPath]],
    trusted_keys: tuple[Path, ...] = (),
) -> Manifest:
    """Parse and sanity-check `model.json`, refusing a format this appliance does not read or an edited file.

    `legacy_paths` gives the served paths of a format 1 manifest, which measured none. With
    `trusted_keys`, model.json must carry a valid signature by one of them (format 2 only:
    format 1 covers neither model.json nor its golden images with a hash).
    """
    path = directory / MANIFEST
    try:
        text = path.read_bytes()
        raw = json.loads(text)
        fmt = raw.get("format", 1)
        if fmt not in FORMATS:
            raise ModelError(f"{path}: format {fmt!r} is not one this appliance reads ({', '.join(map(str, FORMATS))}); "
                             f"upgrade the appliance or reconvert with its convert")
        if trusted_keys and fmt < 2:
            raise ModelError(f"{path}: format {fmt} cannot be signed and model.trusted_keys is set; "
                             "reconvert with convert --sign-key")
        if fmt >= 2:
            _check_digest(directory, text)
        if trusted_keys:
            verify_signature(directory, text, trusted_keys)
        artifacts = {key: Artifact.from_json(key, a) for key, a in raw["artifacts"].items()}
        golden = _images(raw.get("golden", []))
        verification = dict(raw.get("verification", {}))
        verification_set = _images(verification.pop("set", []))
        # From format 2 on every file the server reads is hashed: a golden image without one would
        # let whoever edits the directory choose what the self-check compares against.
        for what, images in (("golden", golden if fmt >= 2 else ()), ("verification", verification_set)):
            unhashed = [g.file for g in images if g.sha256 is None]
            if unhashed:
                raise ValueError(f"{what} {unhashed[0]} has no sha256")
        if fmt >= 2:
            served = tuple(ServedPath.from_json(p) for p in raw["served_paths"].values())
        else:
            served = tuple(legacy_paths(artifacts.values()))
        unknown = sorted({p.artifact for p in served} - set(artifacts))
        if unknown:
            raise ValueError(f"served_paths name artifacts it does not list: {', '.join(unknown)}")
        manifest = Manifest(
            directory=directory,
            name=str(raw["name"]),
            version=str(raw["version"]),
            demo=bool(raw.get("demo", False)),
            labels=tuple(str(label) for label in raw["labels"]),
            input_shape=tuple(int(d) for d in raw["input"]["shape"]),
            preprocessing=Preprocessing.from_manifest(raw.get("preprocessing", {})),
            artifacts=artifacts,
            golden=golden,
            served_paths=served,
            input_name=str(raw["input"].get("name", INPUT_NAME)),
            output_name=str(raw.get("output", {}).get("name", OUTPUT_NAME)),
            format=int(fmt),
            created_at=str(raw.get("created_at", "")),
            source=dict(raw.get("source", {})),
            verification=verification,
            verification_set=verification_set,
        )
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a valid manifest ({type(exc).__name__}: {exc})") from None
    crop = manifest.preprocessing.crop
    if manifest.input_shape[1:] != (3, crop, crop):
        raise ModelError(f"{path}: input shape {list(manifest.input_shape)} does not match the {crop}x{crop} crop")
    for what, images in (("golden", golden), ("verification", verification_set)):
        for image in images:
            if len(image.probabilities) != len(manifest.labels):
                raise ModelError(f"{path}: {what} {image.file} has {len(image.probabilities)} probabilities "
                                 f"for {len(manifest.labels)} labels")
    return manifest


def _images(entries: Iterable[Mapping[str, Any]]) -> tuple[GoldenImage, ...]:
    """Golden or verification entries: a file inside the version directory, its sha256 and PyTorch's probabilities."""
    images = tuple(GoldenImage(str(g["file"]), tuple(float(p) for p in g["probabilities"]),
                               str(g["sha256"]) if g.get("sha256") else None) for g in entries)
    for image in images:
        name = PurePosixPath(image.file)
        if name.is_absolute() or ".." in name.parts:
            raise ValueError(f"unsafe file name {image.file!r}")
    return images


def _check_digest(directory: Path, text: bytes) -> None:
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


def signed_message(manifest_bytes: bytes) -> bytes:
    """What a model signature signs: SIGNED_PREFIX and model.json's hex sha256."""
    return SIGNED_PREFIX + hashlib.sha256(manifest_bytes).hexdigest().encode()


def read_signing_key(key_file: Path) -> Any:
    """The Ed25519 private key in `key_file` (unencrypted PEM, as `openssl genpkey -algorithm ed25519` writes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"--sign-key {key_file}: cannot read an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ModelError(f"--sign-key {key_file}: expected an Ed25519 private key; got {type(key).__name__}")
    return key


def sign_manifest(directory: Path, key: Any) -> Path:
    """Write SIGNATURE beside model.json, signed with `key` (see read_signing_key); its path."""
    signature = key.sign(signed_message((directory / MANIFEST).read_bytes()))
    path = directory / SIGNATURE
    path.write_text(base64.b64encode(signature).decode() + "\n", encoding="ascii")
    return path


def load_trusted_keys(paths: Iterable[Path]) -> list[tuple[Path, Any]]:
    """(path, Ed25519 public key) for each PEM file of `model.trusted_keys`; ModelError naming a bad one."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = []
    for path in paths:
        try:
            key = load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"model.trusted_keys: {path}: cannot read a PEM public key ({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ModelError(f"model.trusted_keys: {path}: expected an Ed25519 public key; got {type(key).__name__}")
        keys.append((Path(path), key))
    return keys


def signature_ok(manifest_bytes: bytes, signature_text: bytes, keys: list[tuple[Path, Any]]) -> bool:
    """Whether `signature_text` (SIGNATURE's content) signs these model.json bytes by one of `keys`."""
    from cryptography.exceptions import InvalidSignature

    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
    except (ValueError, binascii.Error):
        return False
    for _, key in keys:
        try:
            key.verify(signature, signed_message(manifest_bytes))
            return True
        except InvalidSignature:
            continue
    return False


def verify_signature(directory: Path, manifest_bytes: bytes, trusted_keys: tuple[Path, ...]) -> None:
    """Refuse model.json unless SIGNATURE beside it signs it by one of `trusted_keys` (one line naming both)."""
    keys = load_trusted_keys(trusted_keys)
    path = directory / SIGNATURE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; model.trusted_keys is set, so only a model signed by one of them "
                         "(convert --sign-key) loads") from None
    if not signature_ok(manifest_bytes, text, keys):
        names = ", ".join(str(p) for p, _ in keys)
        raise ModelError(f"{path}: not a valid signature of {MANIFEST} by any of model.trusted_keys ({names})")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: Path, files: Iterable[Path]) -> dict[str, str]:
    """Map each file (relative to `directory`, POSIX separators) to its sha256."""
    return {path.relative_to(directory).as_posix(): sha256_file(path) for path in files}


def verify_files(directory: Path, files: Mapping[str, str], what: str) -> None:
    """Check every file (relative path -> sha256) against the manifest's sha256."""
    for relative, expected in files.items():
        path = directory / relative
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise ModelError(f"{path}: missing ({what})") from None
        if actual != expected:
            raise ModelError(f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}…")
