"""A conversion in progress (`Build`) and its artifact steps, each writing artifacts and checking them against PyTorch.

A step is a function of the Build: it writes files into the build directory, adds
the artifacts they make (with their parity) and notes what it left out. To add an
artifact, write a step and put it in `artifact_steps`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checkpoint import LoadedModel
from .errors import ConvertError
from .images import ImageSet
from .served import Bar, Photo
from .verify import Parity, Runner, bar_for, infer_all, load_runtime, measure, top1_agreement

if TYPE_CHECKING:  # quantize imports ONNX Runtime's quantization tools: only when INT8 is made
    from .quantize import Int8Result

FRAGILITY_SEED = 6_000
BATCH = 16  # parity and the INT8 search: any batch, the figures do not depend on it


def say(message: str) -> None:
    """Progress and warnings go to stderr; stdout carries only the parity table."""
    print(message, file=sys.stderr, flush=True)


def shout(message: str) -> None:
    """A warning nobody should miss."""
    line = "!" * 78
    print(f"{line}\nWARNING: {message}\n{line}", file=sys.stderr, flush=True)


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
    # What the version carries for a box to prove its paths on: the verification photos as taken, or only
    # the 224 px crops PyTorch saw (--verification-set crops: no whole photo, no EXIF leaves the clinic's machine).
    verification_set: str = "photos"


@dataclass
class Split:
    """The clinic's photos, three ways."""

    calibration: np.ndarray | None  # None: no photos given, no INT8
    selection: np.ndarray
    verification: list[Photo]
    source: str  # "held-out" or "synthetic"
    warning: str | None = None


@dataclass(frozen=True)
class Built:
    """An artifact written to the build directory, the main file first, with its parity against PyTorch FP32."""

    key: str
    format: str
    precision: str
    files: list[Path]
    parity: Parity
    details: dict[str, Any] = field(default_factory=dict)  # written to its model.json table as they are
    # Its probabilities on the verification tensors: the served path with the exact decode is given those
    # very tensors, so it reuses them instead of running the artifact again (served.measure_paths).
    probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class Build:
    """One conversion in progress: its inputs, the photos it verifies on, and what its steps have made."""

    model: LoadedModel
    root: Path  # the hidden directory that becomes <out>/<name>/<version>/
    work: Path  # scratch (INT8 candidates), deleted afterwards
    split: Split
    calibration: ImageSet | None
    options: ConvertOptions
    photos: list[Photo]  # the verification photos and their copies at phone sizes
    verification: np.ndarray  # their reference tensors
    reference: np.ndarray  # PyTorch FP32 on them
    steps: list[Step]
    artifacts: list[Built] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # a line each for the table: what was not made, and why

    def run(self) -> None:
        """Run every artifact step, in order."""
        for step in self.steps:
            step(self)

    def add(self, key: str, fmt: str, precision: str, files: list[Path], details: dict[str, Any] | None = None) -> None:
        """Verify the artifact in `files` on the appliance's runtime for `fmt`, and keep it."""
        probs = infer_all(load_runtime(files[0], fmt).infer, self.verification, batch=BATCH, desc=f"verifying: {key}")
        parity = measure(self.reference, probs, self.options.labels, bar_for(precision))
        self.artifacts.append(Built(key, fmt, precision, files, parity, details or {}, probs))


Step = Callable[[Build], None]


def artifact_steps(options: ConvertOptions) -> list[Step]:
    """The steps a conversion with these options runs, in order."""
    return [onnx_fp32, openvino_fp32, *([openvino_fp16] if options.fp16 else []), require_fp32_parity, int8]


def onnx_fp32(build: Build) -> None:
    """The ONNX FP32 export: every other artifact is made from it."""
    from .export import export_onnx

    say("exporting ONNX FP32")
    path = build.root / "model.onnx"
    opset = export_onnx(build.model, path)
    build.add("onnx-fp32", "onnx", "fp32", [path], {"opset": opset})


def openvino_fp32(build: Build) -> None:
    """OpenVINO IR of the FP32 graph."""
    from .openvino import convert_ir

    say("converting to OpenVINO IR FP32")
    build.add("openvino-fp32", "openvino", "fp32", convert_ir(build.root / "model.onnx", build.root / "openvino" / "fp32" / "model.xml"))


def openvino_fp16(build: Build) -> None:
    """OpenVINO IR with FP16-compressed weights (--fp16)."""
    from .openvino import convert_ir

    files = convert_ir(build.root / "model.onnx", build.root / "openvino" / "fp16" / "model.xml", compress_to_fp16=True)
    build.add("openvino-fp16", "openvino", "fp16", files)


def require_fp32_parity(build: Build) -> None:
    """An FP32 artifact that disagrees with PyTorch is a wrong export: stop, unless --allow-degraded keeps it."""
    for art in build.artifacts:
        if art.precision == "fp32" and not art.parity.passed:
            message = (
                f"{art.key} disagrees with PyTorch (max |dp| {art.parity.max_abs_dp:.2e}, top-1 "
                f"{art.parity.top1_agreement:.2%}; bar {art.parity.bar}): the export is wrong"
            )
            if not build.options.allow_degraded:
                raise ConvertError(message + "; --allow-degraded keeps it anyway, marked degraded")
            shout(message + "; kept as degraded because of --allow-degraded")


def int8(build: Build) -> None:
    """Quantize, searching on calibration and selection photos only; ONNX and OpenVINO INT8 when it meets the bar."""
    from .openvino import convert_ir
    from .quantize import Variant, exact_runner, quantize_int8

    split, options, root = build.split, build.options, build.root
    if split.calibration is None:
        say("INT8 skipped: no --calibration-dir given (INT8 is calibrated on your own photos)")
        build.left_out.append("onnx-int8 and openvino-int8 skipped: no --calibration-dir")
        return
    calib, selection = split.calibration, split.selection
    bar = options.bar.min_agreement
    calib_reference = infer_all(build.model.probabilities, calib, batch=BATCH, desc="calibration images: PyTorch FP32")
    selection_reference = infer_all(build.model.probabilities, selection, batch=BATCH, desc="selection images: PyTorch FP32")

    def evaluate(path: Path, runner: Runner | None = None) -> float:
        # The search looks at selection and calibration photos, never at verification ones.
        runner = runner or load_runtime(path, "onnx").infer
        agreement = 1.0
        for reference, tensors in ((selection_reference, selection), (calib_reference, calib)):
            if len(tensors):
                agreement = min(agreement, top1_agreement(reference, infer_all(runner, tensors, batch=BATCH, desc="INT8 candidate")))
            if agreement < bar:  # no need to look further
                break
        return agreement

    def fragility() -> float:
        # Input noise of sigma 0.005 in normalised units: about INT8's rounding of the input alone
        # (a step of ~0.017 has a rounding noise of step / sqrt(12)).
        tensors = np.concatenate([selection, calib])
        noisy = (tensors + np.random.default_rng(FRAGILITY_SEED).normal(0, 0.005, tensors.shape)).astype(np.float32)
        reference = np.concatenate([selection_reference, calib_reference])
        runner = load_runtime(root / "model.onnx", "onnx").infer
        return top1_agreement(reference, infer_all(runner, noisy, batch=BATCH, desc="FP32 under input noise"))

    say(f"quantizing to INT8 on {len(calib)} calibration photos ({len(selection)} for selection, "
        f"{len(split.verification)} for verification)")
    result = quantize_int8(root / "model.onnx", build.work, calib, evaluate, bar=bar, methods=options.methods,
                           fragility=fragility, say=say)
    if not result.passed:
        # The same INT8 model with its arithmetic done exactly tells this CPU's kernels from the model.
        result.exact_agreement = evaluate(result.path, exact_runner(result.path))
        say(f"INT8 with exact arithmetic (no INT8 kernels): top-1 agreement {result.exact_agreement:.2%}")
    if result.passed and result.kept_float_nodes:
        say(f"INT8 keeps {len(result.kept_float_nodes)} node(s) in float: {', '.join(result.kept_float_nodes[:8])}{' ...' if len(result.kept_float_nodes) > 8 else ''}")
    why = "" if result.passed else _int8_why(result, bar)
    if why and not options.allow_degraded:
        shout(f"{why}; onnx-int8 and openvino-int8 are LEFT OUT (--allow-degraded keeps them, marked degraded)")
        build.left_out.append(f"onnx-int8 and openvino-int8 left out: {why}")
        return
    onnx_int8 = root / "model.int8.onnx"
    shutil.copyfile(result.path, onnx_int8)
    details = {
        "kept_float_nodes": result.kept_float_nodes,
        # The recipe (convert/quantize.py): weight precision, and the stem it keeps in float.
        "weight_bits": Variant().weight_bits,
        "float_stem": result.float_stem,
        "calibration": {
            "images": len(calib),
            "selection_images": len(selection),
            "method": result.method,
            "skipped_unreadable": build.calibration.skipped if build.calibration is not None else 0,
            "tried": [a.to_json() for a in result.attempts],
            "fp32_under_noise": result.fp32_under_noise,
        },
    }
    build.add("onnx-int8", "onnx", "int8", [onnx_int8], details)
    say("converting INT8 to OpenVINO IR")
    build.add("openvino-int8", "openvino", "int8", convert_ir(onnx_int8, root / "openvino" / "int8" / "model.xml"), details)
    if why:
        shout(f"{why}; kept as DEGRADED because of --allow-degraded")
        build.left_out.append(f"onnx-int8 and openvino-int8 kept degraded (--allow-degraded): {why}")


def _int8_why(result: Int8Result, bar: float) -> str:
    """Why INT8 missed the bar, in a line: this CPU's INT8 kernels, FP32's own fragility, or how far the
    search went and where it hurt."""
    from appliance.inference.proof import instruction_sets

    why = f"INT8 reached at best {result.agreement:.2%} top-1 agreement on the selection photos (bar {bar:.0%})"
    exact = result.exact_agreement
    if exact is not None and exact >= bar:
        isa = ", ".join(instruction_sets()) or "no AVX2"
        return (why + f" through this CPU's INT8 kernels ({isa}), and {exact:.2%} with the same INT8 model's "
                f"arithmetic done exactly: this CPU's kernels miss the bar, not the quantized model (a CPU with "
                f"other kernels may pass; every box proves its paths on its own CPU)")
    if exact is not None:
        why += f", and {exact:.2%} with its arithmetic done exactly (the quantization itself, not this CPU's kernels)"
    if result.fp32_under_noise is not None and result.fp32_under_noise < bar:
        return (why + f": FP32 itself keeps its answer on only {result.fp32_under_noise:.2%} of them when the input "
                f"moves by less than INT8 rounds it, so these photos sit on near-ties no INT8 graph can hold")
    most = max(len(a.kept_float_nodes) for a in result.attempts)
    why += f", with every calibration method and with up to {most} node(s) kept in float"
    if result.worst_nodes:
        why += f"; the signal-to-noise ratio drops most at {', '.join(result.worst_nodes)}"
    return why
