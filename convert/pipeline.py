"""One conversion, start to finish: export, quantize, convert, verify, write the model directory.

The clinic's photos are split three ways: calibration (INT8 ranges), selection (what the
INT8 search may look at) and verification (only reported: the artifact parity and every
served path's figures, never a choice of the search). Everything is built in a hidden
temporary directory inside `<out>/<name>/` and renamed to `<out>/<name>/<version>/` only
when complete, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.modeldir import Artifact, GoldenImage, Manifest, Preprocessing, input_shape, now, sha256_file, write_json, write_manifest

from . import golden as golden_mod
from .checkpoint import LoadedModel
from .errors import ConvertError
from .images import ImageSet, jpeg_bytes
from .runtimes import Runner, onnx_runner, openvino_runner, run_all, torch_runner
from .served import MIN_VERIFICATION_PHOTOS, Bar, Candidate, Photo, format_paths, measure_paths, reference_tensors, with_phone_size_copies
from .synthetic import synthetic_photos
from .verify import Parity, bar_for, measure, top1_agreement

if TYPE_CHECKING:  # quantize imports ONNX Runtime's quantization tools: only when INT8 is made
    from .quantize import Int8Result

HOLDOUT_SEED = 0
SYNTHETIC_SEED = 5_000
FRAGILITY_SEED = 6_000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ConvertOptions:
    """Choices that shape one conversion (the CLI's options, minus paths)."""

    labels: list[str]
    allow_degraded: bool = False
    fp16: bool = False
    demo: bool = False
    holdout_fraction: float = 0.3  # verification photos
    selection_fraction: float = 0.2  # photos the INT8 search may look at
    heldout_count: int | None = None  # exact verification count (the last images), overriding the fraction
    selection_count: int | None = None  # exact selection count, overriding the fraction
    synthetic_images: int = 32
    methods: tuple[str, ...] = ("MinMax", "Entropy", "Percentile")
    bar: Bar = field(default_factory=Bar)


@dataclass
class _Artifact:
    key: str
    fmt: str
    precision: str
    files: list[Path]
    runner: Runner
    parity: Parity
    extra: dict = field(default_factory=dict)


@dataclass
class Split:
    """The clinic's photos, three ways."""

    calibration: np.ndarray | None  # None: no photos given, no INT8
    selection: np.ndarray
    verification: list[Photo]
    source: str  # "held-out" or "synthetic"
    warning: str | None = None


def say(message: str) -> None:
    """Progress and warnings go to stderr; stdout carries only the parity table."""
    print(message, file=sys.stderr, flush=True)


def shout(message: str) -> None:
    """A warning nobody should miss."""
    line = "!" * 78
    print(f"{line}\nWARNING: {message}\n{line}", file=sys.stderr, flush=True)


def next_version(name_dir: Path) -> int:
    """One more than the largest integer version directory present (1 when none)."""
    versions = [int(p.name) for p in name_dir.iterdir() if p.is_dir() and p.name.isdigit()] if name_dir.is_dir() else []
    return max(versions, default=0) + 1


def convert(
    model: LoadedModel,
    *,
    out: Path,
    name: str,
    version: int | None,
    calibration: ImageSet | None,
    options: ConvertOptions,
    source_extra: dict | None = None,
) -> Path:
    """Convert `model` into `<out>/<name>/<version>/` and return that directory."""
    if not NAME_RE.match(name):
        raise ConvertError(f"--name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")
    if len(options.labels) != model.num_classes:
        raise ConvertError(
            f"the checkpoint has {model.num_classes} classes but {len(options.labels)} labels were given "
            f"({', '.join(options.labels)}); pass --labels with {model.num_classes} names"
        )
    if len(set(options.labels)) != len(options.labels):
        raise ConvertError(f"--labels must be distinct; got {', '.join(options.labels)}")
    name_dir = out / name
    if version is None:
        version = next_version(name_dir)
    elif version < 1:
        raise ConvertError(f"--version must be a positive integer; got {version}")
    final = name_dir / str(version)
    if final.exists():
        raise ConvertError(f"{final} already exists; pick another --version or leave it out to use the next one")

    split = _split(calibration, options)
    created_name_dir = not name_dir.exists()
    name_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".building-{version}-", dir=name_dir))
    try:
        with tempfile.TemporaryDirectory(prefix="convert-work-") as work:
            manifest, table = _build(model, building, Path(work), name, version, split, calibration, options, source_extra)
        write_manifest(manifest)
        try:
            os.rename(building, final)
        except OSError as exc:
            raise ConvertError(f"cannot move the finished model into {final}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if created_name_dir:
            try:
                name_dir.rmdir()
            except OSError:
                pass
        raise
    print(table, flush=True)
    say(f"wrote {final}")
    return final


def _split(calibration: ImageSet | None, options: ConvertOptions) -> Split:
    """Calibration, selection and verification photos; only photos the server accepts verify."""
    if calibration is None:
        return Split(None, np.zeros((0, 3, 224, 224), np.float32), _synthetic_photos(options), "synthetic")
    n = len(calibration.tensors)
    order = [int(i) for i in np.random.default_rng(HOLDOUT_SEED).permutation(n)]
    if options.heldout_count is not None:
        chosen = list(range(n - options.heldout_count, n))
    else:
        eligible = [i for i in order if calibration.servable[i]]
        # At least one photo calibrates; then one verifies, then one selects, as far as they go.
        held = min(len(eligible), n - 1, max(1 if n >= 2 else 0, round(n * options.holdout_fraction)))
        chosen = sorted(eligible[:held])
    rest = [i for i in order if i not in set(chosen)]
    wanted = options.selection_count if options.selection_count is not None else round(n * options.selection_fraction)
    pick = min(len(rest) - 1, max(1 if len(rest) >= 2 else 0, wanted))
    selection = sorted(rest[:pick])
    taken = set(chosen) | set(selection)
    calib = calibration.tensors[[i for i in range(n) if i not in taken]]
    verification = [Photo(calibration.names[i], calibration.data(i)) for i in chosen]
    source, warning = "held-out", None
    if not verification:
        warning = (f"none of the {n} photo(s) could verify (the server accepts JPEG, PNG and WebP, and one photo "
                   f"is needed to calibrate); served paths were measured on {options.synthetic_images} synthetic photos")
        verification, source = _synthetic_photos(options), "synthetic"
    elif len(verification) < MIN_VERIFICATION_PHOTOS:
        warning = (f"only {len(verification)} verification photo(s), fewer than {MIN_VERIFICATION_PHOTOS}: one "
                   f"disagreement moves top-1 by {1 / len(verification):.0%}; add photos to --calibration-dir")
    return Split(calib, calibration.tensors[selection], verification, source, warning)


def _synthetic_photos(options: ConvertOptions) -> list[Photo]:
    """Procedural photos to verify on when the clinic gave none that can."""
    images = synthetic_photos(options.synthetic_images, SYNTHETIC_SEED)
    return [Photo(f"synthetic-{i}", jpeg_bytes(image)) for i, image in enumerate(images)]


def _build(model: LoadedModel, root: Path, work: Path, name: str, version: int, split: Split,
           calibration: ImageSet | None, options: ConvertOptions, source_extra: dict | None) -> tuple[Manifest, str]:
    from .export import export_onnx
    from .openvino import convert_ir, cpu_has_bf16

    labels = options.labels
    reference_runner = torch_runner(model.module)
    photos = with_phone_size_copies(split.verification)
    copies = sum(p.is_copy for p in photos)
    say(f"verifying on {len(split.verification)} {split.source} photos and {copies} copies of them at phone sizes")
    verification = reference_tensors(photos)
    reference = run_all(reference_runner, verification, desc="verifying: PyTorch FP32")
    artifacts: list[_Artifact] = []

    def verify(key: str, runner: Runner, precision: str) -> Parity:
        probs = run_all(runner, verification, desc=f"verifying: {key}")
        return measure(reference, probs, labels, bar_for(precision))

    say("exporting ONNX FP32")
    onnx_fp32 = root / "model.onnx"
    opset = export_onnx(model, onnx_fp32)
    runner = onnx_runner(onnx_fp32)
    artifacts.append(_Artifact("onnx-fp32", "onnx", "fp32", [onnx_fp32], runner, verify("onnx-fp32", runner, "fp32"), {"opset": opset}))

    say("converting to OpenVINO IR FP32")
    ov_fp32 = convert_ir(onnx_fp32, root / "openvino" / "fp32" / "model.xml")
    runner = openvino_runner(ov_fp32[0])
    artifacts.append(_Artifact("openvino-fp32", "openvino", "fp32", ov_fp32, runner, verify("openvino-fp32", runner, "fp32")))
    if options.fp16:
        ov_fp16 = convert_ir(onnx_fp32, root / "openvino" / "fp16" / "model.xml", compress_to_fp16=True)
        runner = openvino_runner(ov_fp16[0])
        artifacts.append(_Artifact("openvino-fp16", "openvino", "fp16", ov_fp16, runner, verify("openvino-fp16", runner, "fp16")))

    for art in artifacts:
        if art.precision == "fp32" and not art.parity.passed:
            message = (
                f"{art.key} disagrees with PyTorch (max |dp| {art.parity.max_abs_dp:.2e}, top-1 "
                f"{art.parity.top1_agreement:.2%}; bar {art.parity.bar}): the export is wrong"
            )
            if not options.allow_degraded:
                raise ConvertError(message + "; --allow-degraded keeps it anyway, marked degraded")
            shout(message + "; kept as degraded because of --allow-degraded")

    if split.calibration is None:
        say("INT8 skipped: no --calibration-dir given (INT8 is calibrated on your own photos)")
        left_out = ["onnx-int8 and openvino-int8 skipped: no --calibration-dir"]
    else:
        left_out = _int8(root, work, split, reference_runner, artifacts, verify, options, calibration)

    say("writing golden vectors")
    golden = golden_mod.write_golden(root / "golden", reference_runner)
    if golden.low_margin:
        say(f"note: {golden.low_margin} golden image(s) have a top-1 margin under {golden_mod.MIN_MARGIN}; the model is rarely that sure of synthetic photos")

    say("measuring served paths (artifact, decode mode, precision) as the server runs them")
    bf16 = cpu_has_bf16()
    spec = Preprocessing()
    candidates = [Candidate(a.key, a.fmt, a.precision, a.files[0]) for a in artifacts]
    paths = measure_paths(candidates, photos, reference, ([f.read_bytes() for f in golden.files], golden.probabilities),
                          spec, labels, options.bar, bf16=bf16, say=say)
    if not bf16:
        left_out.append("openvino-fp32@bf16 not measured: this CPU has no native bf16")

    notes: dict[str, str] = {}
    entries: dict[str, Artifact] = {}
    for art in artifacts:
        mine = [p for p in paths if p.artifact == art.key]
        entries[art.key] = Artifact.hashed(
            art.key,
            root,
            art.fmt,
            art.precision,
            art.files,
            degraded=not art.parity.passed,
            # Format 1's tolerance, for older appliances: the strictest of this artifact's passing paths.
            selfcheck_max_abs_dp=min((p.selfcheck_max_abs_dp for p in mine if p.passed),
                                     default=max(p.selfcheck_max_abs_dp for p in mine)),
            details={"parity": art.parity.to_json(), **art.extra},
        )
        if not art.parity.passed:
            notes.update({p.key: "degraded, kept (--allow-degraded)" for p in mine})
    for runtime in sorted({p.runtime for p in paths}):
        passing = [p for p in paths if p.runtime == runtime and p.passed and p.inference_precision == "f32"]
        if passing:
            best = min(passing, key=lambda p: p.ms_per_image or 0.0)
            notes[best.key] = (notes.get(best.key, "") + f"  <- served by runtime.backend = \"{runtime}\"").strip()

    source = {
        "file": model.path.name,
        "sha256": model.sha256,
        "form": model.form,
        "arch": model.arch,
        "head": model.head,
        **(source_extra or {}),
    }
    write_json(root / "source.json", {"path": str(model.path.resolve()) if not options.demo else None, **source})
    warnings = [w for w in (split.warning,) if w]
    manifest = Manifest(
        directory=root,
        name=name,
        version=str(version),
        demo=options.demo,
        labels=tuple(labels),
        input_shape=input_shape(spec),
        preprocessing=spec,
        created_at=now(),
        source=source,
        artifacts=entries,
        golden=tuple(
            GoldenImage(path.relative_to(root).as_posix(), tuple(float(x) for x in probs), sha256_file(path))
            for path, probs in zip(golden.files, golden.probabilities)
        ),
        served_paths=tuple(paths),
        verification={"photos": len(split.verification), "source": split.source, "copies": copies,
                      "min_photos": MIN_VERIFICATION_PHOTOS, "bar": options.bar.to_json(), "warnings": warnings},
    )
    table = format_paths(paths, options.bar, notes)
    for line in left_out + [f"WARNING: {w}" for w in warnings]:
        table += f"\n{line}"
    if not any(p.passed for p in paths):
        shout("no served path met the bar: the appliance will refuse to serve this model (its message names the "
              "settings); add photos to --calibration-dir, or relax --min-agreement / --max-dp")
    return manifest, table


def _int8(root: Path, work: Path, split: Split, reference_runner: Runner, artifacts: list[_Artifact],
          verify: Callable[[str, Runner, str], Parity], options: ConvertOptions, calibration: ImageSet | None) -> list[str]:
    """Quantize, searching on calibration and selection photos only; return lines for what was left out."""
    from .openvino import convert_ir
    from .quantize import quantize_int8

    assert split.calibration is not None
    calib, selection = split.calibration, split.selection
    bar = options.bar.min_agreement
    calib_reference = run_all(reference_runner, calib, desc="calibration images: PyTorch FP32")
    selection_reference = run_all(reference_runner, selection, desc="selection images: PyTorch FP32")

    def evaluate(path: Path) -> float:
        # The search looks at selection and calibration photos, never at verification ones.
        runner = onnx_runner(path)
        agreement = 1.0
        for reference, tensors in ((selection_reference, selection), (calib_reference, calib)):
            if len(tensors):
                agreement = min(agreement, top1_agreement(reference, run_all(runner, tensors, desc="INT8 candidate")))
            if agreement < bar:  # no need to look further
                break
        return agreement

    def fragility() -> float:
        # Input noise of sigma 0.005 in normalised units: about INT8's rounding of the input alone
        # (a step of ~0.017 has a rounding noise of step / sqrt(12)).
        tensors = np.concatenate([selection, calib])
        noisy = (tensors + np.random.default_rng(FRAGILITY_SEED).normal(0, 0.005, tensors.shape)).astype(np.float32)
        reference = np.concatenate([selection_reference, calib_reference])
        return top1_agreement(reference, run_all(onnx_runner(root / "model.onnx"), noisy, desc="FP32 under input noise"))

    say(f"quantizing to INT8 on {len(calib)} calibration photos ({len(selection)} for selection, "
        f"{len(split.verification)} for verification)")
    result = quantize_int8(root / "model.onnx", work, calib, evaluate, bar=bar, methods=options.methods,
                           fragility=fragility, say=say)
    if result.passed and result.kept_float_nodes:
        say(f"INT8 keeps {len(result.kept_float_nodes)} node(s) in float: {', '.join(result.kept_float_nodes[:8])}{' ...' if len(result.kept_float_nodes) > 8 else ''}")
    why = "" if result.passed else _int8_why(result, bar)
    if why and not options.allow_degraded:
        shout(f"{why}; onnx-int8 and openvino-int8 are LEFT OUT (--allow-degraded keeps them, marked degraded)")
        return [f"onnx-int8 and openvino-int8 left out: {why}"]
    onnx_int8 = root / "model.int8.onnx"
    shutil.copyfile(result.path, onnx_int8)
    extra = {
        "kept_float_nodes": result.kept_float_nodes,
        "calibration": {
            "images": len(calib),
            "selection_images": len(selection),
            "method": result.method,
            "skipped_unreadable": calibration.skipped if calibration is not None else 0,
            "tried": [a.to_json() for a in result.attempts],
            "fp32_under_noise": result.fp32_under_noise,
        },
    }
    runner = onnx_runner(onnx_int8)
    artifacts.append(_Artifact("onnx-int8", "onnx", "int8", [onnx_int8], runner, verify("onnx-int8", runner, "int8"), extra))
    say("converting INT8 to OpenVINO IR")
    ov_int8 = convert_ir(onnx_int8, root / "openvino" / "int8" / "model.xml")
    runner = openvino_runner(ov_int8[0])
    artifacts.append(_Artifact("openvino-int8", "openvino", "int8", ov_int8, runner, verify("openvino-int8", runner, "int8"), extra))
    if why:
        shout(f"{why}; kept as DEGRADED because of --allow-degraded")
        return [f"onnx-int8 and openvino-int8 kept degraded (--allow-degraded): {why}"]
    return []


def _int8_why(result: Int8Result, bar: float) -> str:
    """Why INT8 missed the bar, in a line: FP32's own fragility, or how far the search went and where it hurt."""
    why = f"INT8 reached at best {result.agreement:.2%} top-1 agreement on the selection photos (bar {bar:.0%})"
    if result.fp32_under_noise is not None and result.fp32_under_noise < bar:
        return (why + f": FP32 itself keeps its answer on only {result.fp32_under_noise:.2%} of them when the input "
                f"moves by less than INT8 rounds it, so these photos sit on near-ties no INT8 graph can hold")
    most = max(len(a.kept_float_nodes) for a in result.attempts)
    why += f", with every calibration method and with up to {most} node(s) kept in float"
    if result.worst_nodes:
        why += f"; the signal-to-noise ratio drops most at {', '.join(result.worst_nodes)}"
    return why
