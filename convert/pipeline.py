"""One conversion, start to finish: export, quantize, convert, verify, write the model directory.

Everything is built in a hidden temporary directory inside `<out>/<name>/` and renamed to
`<out>/<name>/<version>/` only when complete, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import golden as golden_mod
from .checkpoint import LoadedModel
from .errors import ConvertError
from .images import ImageSet, preprocess
from .manifest import artifact_entry, build_manifest, write_json
from .runtimes import Runner, onnx_runner, openvino_runner, run_all, torch_runner
from .synthetic import synthetic_photos
from .verify import Parity, bar_for, format_table, measure, top1_agreement

HOLDOUT_SEED = 0
SYNTHETIC_SEED = 5_000
FP32_SELFCHECK = 0.01
LATENCY_RUNS = 5
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ConvertOptions:
    """Choices that shape one conversion (the CLI's options, minus paths)."""

    labels: list[str]
    allow_degraded: bool = False
    fp16: bool = False
    demo: bool = False
    holdout_fraction: float = 0.3
    heldout_count: int | None = None  # exact held-out count (the last images), overriding the fraction
    synthetic_images: int = 32
    methods: tuple[str, ...] = ("MinMax", "Entropy", "Percentile")


@dataclass
class _Artifact:
    key: str
    fmt: str
    precision: str
    files: list[Path]
    runner: Runner
    parity: Parity
    extra: dict = field(default_factory=dict)


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

    calib, heldout, heldout_source = _split(calibration, options)
    created_name_dir = not name_dir.exists()
    name_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".building-{version}-", dir=name_dir))
    try:
        with tempfile.TemporaryDirectory(prefix="convert-work-") as work:
            manifest, table = _build(model, building, Path(work), name, version, calib, heldout, heldout_source, calibration, options, source_extra)
        write_json(building / "model.json", manifest)
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


def _split(calibration: ImageSet | None, options: ConvertOptions) -> tuple[np.ndarray | None, np.ndarray, str]:
    if calibration is None:
        photos = synthetic_photos(options.synthetic_images, SYNTHETIC_SEED)
        return None, preprocess(photos), "synthetic"
    n = len(calibration.tensors)
    if n < 2:
        raise ConvertError(f"the calibration directory has {n} readable image; at least 2 are needed (some calibrate, some verify)")
    if options.heldout_count is not None:
        held = options.heldout_count
        return calibration.tensors[: n - held], calibration.tensors[n - held :], "held-out"
    held = min(n - 1, max(1, round(n * options.holdout_fraction)))
    order = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return calibration.tensors[np.sort(order[held:])], calibration.tensors[np.sort(order[:held])], "held-out"


def _latency_ms(runner: Runner, sample: np.ndarray) -> float:
    runner(sample)  # the first run compiles kernels and allocates; not what a request pays
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        runner(sample)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1000, 2)


BF16_ROW = "openvino@bf16"


def _bf16(xml_path: Path, verify: Callable[[str, Runner, str], Parity]) -> tuple[str, Parity | None, str]:
    """The FP32 IR run with bf16 inference precision (a serving option): its parity row, if this CPU has bf16."""
    from .openvino import cpu_has_bf16

    if not cpu_has_bf16():
        return (BF16_ROW, None, "not measured: this CPU has no native bf16")
    return (BF16_ROW, verify(BF16_ROW, openvino_runner(xml_path, precision="bf16"), "bf16"),
            "serving option of openvino-fp32 (runtime.openvino.inference_precision = \"bf16\")")


def _build(model, root, work, name, version, calib, heldout, heldout_source, calibration, options, source_extra):
    from .export import export_onnx
    from .openvino import convert_ir
    from .quantize import quantize_int8

    labels = options.labels
    reference_runner = torch_runner(model.module)
    reference = run_all(reference_runner, heldout, desc="verifying: PyTorch FP32")
    say(f"verifying on {len(heldout)} {heldout_source} images")
    artifacts: list[_Artifact] = []
    rows: list[tuple[str, Parity | None, str]] = []

    def verify(key: str, runner: Runner, precision: str) -> Parity:
        probs = run_all(runner, heldout, desc=f"verifying: {key}")
        return measure(reference, probs, labels, bar_for(precision))

    say("exporting ONNX FP32")
    onnx_fp32 = root / "model.onnx"
    opset = export_onnx(model, onnx_fp32)
    runner = onnx_runner(onnx_fp32)
    artifacts.append(_Artifact("onnx-fp32", "onnx", "fp32", [onnx_fp32], runner, verify("onnx-fp32", runner, "fp32"), {"opset": opset}))

    say("converting to OpenVINO IR FP32")
    ov_fp32 = convert_ir(onnx_fp32, root / "openvino" / "fp32" / "model.xml")
    runner = openvino_runner(ov_fp32[0])
    bf16_row = _bf16(ov_fp32[0], verify)
    bf16 = bf16_row[1].to_json() if bf16_row[1] is not None else None
    artifacts.append(_Artifact("openvino-fp32", "openvino", "fp32", ov_fp32, runner, verify("openvino-fp32", runner, "fp32"),
                               {"inference_precision": "f32", "bf16_parity": bf16}))
    if options.fp16:
        ov_fp16 = convert_ir(onnx_fp32, root / "openvino" / "fp16" / "model.xml", compress_to_fp16=True)
        runner = openvino_runner(ov_fp16[0])
        artifacts.append(_Artifact("openvino-fp16", "openvino", "fp16", ov_fp16, runner, verify("openvino-fp16", runner, "fp16"), {"inference_precision": "f32"}))

    for art in artifacts:
        if art.precision == "fp32" and not art.parity.passed:
            message = (
                f"{art.key} disagrees with PyTorch (max |dp| {art.parity.max_abs_dp:.2e}, top-1 "
                f"{art.parity.top1_agreement:.2%}; bar {art.parity.bar}): the export is wrong"
            )
            if not options.allow_degraded:
                raise ConvertError(message + "; --allow-degraded keeps it anyway, marked degraded")
            shout(message + "; kept as degraded because of --allow-degraded")

    if calib is None:
        say("INT8 skipped: no --calibration-dir given (INT8 is calibrated on your own photos)")
        rows_int8 = [("onnx-int8", None, "skipped: no --calibration-dir"), ("openvino-int8", None, "skipped: no --calibration-dir")]
    else:
        rows_int8 = _int8(model, root, work, calib, heldout, reference, reference_runner, artifacts, verify, options, calibration, quantize_int8, convert_ir)

    say("writing golden vectors")
    golden = golden_mod.write_golden(root / "golden", reference_runner)
    if golden.low_margin:
        say(f"note: {golden.low_margin} golden image(s) have a top-1 margin under {golden_mod.MIN_MARGIN}; the model is rarely that sure of synthetic photos")

    entries: dict[str, dict] = {}
    sample = heldout[:1]
    for art in artifacts:
        golden_dp = float(np.max(np.abs(art.runner(golden.tensors) - golden.probabilities)))
        selfcheck = FP32_SELFCHECK if art.precision == "fp32" else max(0.05 if art.precision == "int8" else FP32_SELFCHECK, 1.5 * golden_dp)
        entries[art.key] = artifact_entry(
            root,
            art.fmt,
            art.precision,
            art.files,
            degraded=not art.parity.passed,
            selfcheck_max_abs_dp=round(selfcheck, 6),
            parity=art.parity.to_json(),
            latency_ms=_latency_ms(art.runner, sample),
            **art.extra,
        )
        rows.append((art.key, art.parity, "degraded, kept (--allow-degraded)" if not art.parity.passed else ""))
    rows.extend(rows_int8)
    rows.append(bf16_row)
    order = ["onnx-fp32", "onnx-int8", "openvino-fp32", BF16_ROW, "openvino-fp16", "openvino-int8"]
    rows.sort(key=lambda r: order.index(r[0]) if r[0] in order else len(order))

    source = {
        "file": model.path.name,
        "sha256": model.sha256,
        "form": model.form,
        "arch": model.arch,
        "head": model.head,
        **(source_extra or {}),
    }
    write_json(root / "source.json", {"path": str(model.path.resolve()) if not options.demo else None, **source})
    manifest = build_manifest(
        name=name,
        version=version,
        demo=options.demo,
        labels=labels,
        source=source,
        artifacts=entries,
        golden=[
            {"file": path.relative_to(root).as_posix(), "probabilities": [float(x) for x in probs]}
            for path, probs in zip(golden.files, golden.probabilities)
        ],
    )
    return manifest, format_table(rows)


def _int8(model, root, work, calib, heldout, reference, reference_runner, artifacts, verify, options, calibration, quantize_int8, convert_ir):
    bar = bar_for("int8")["top1_agreement"]
    calib_reference = run_all(reference_runner, calib, desc="calibration images: PyTorch FP32")

    def evaluate(path: Path) -> float:
        # Tuned on calibration and held-out images together; the reported parity is on the held-out ones.
        runner = onnx_runner(path)
        held = top1_agreement(reference, run_all(runner, heldout, desc="verifying: INT8 candidate"))
        if held < bar:  # no need to look further
            return held
        return min(held, top1_agreement(calib_reference, run_all(runner, calib, desc="verifying: INT8 candidate (calibration images)")))

    say(f"quantizing to INT8 on {len(calib)} calibration images ({len(heldout)} held out)")
    result = quantize_int8(root / "model.onnx", work, calib, evaluate, bar=bar, methods=options.methods, say=say)
    onnx_int8 = root / "model.int8.onnx"
    shutil.copyfile(result.path, onnx_int8)
    extra = {
        "kept_float_nodes": result.kept_float_nodes,
        "calibration": {
            "images": len(calib),
            "method": result.method,
            "skipped_unreadable": calibration.skipped if calibration is not None else 0,
            "tried": [a.to_json() for a in result.attempts],
        },
    }
    runner = onnx_runner(onnx_int8)
    candidates = [_Artifact("onnx-int8", "onnx", "int8", [onnx_int8], runner, verify("onnx-int8", runner, "int8"), extra)]
    say("converting INT8 to OpenVINO IR")
    ov_int8 = convert_ir(onnx_int8, root / "openvino" / "int8" / "model.xml")
    runner = openvino_runner(ov_int8[0])
    candidates.append(_Artifact("openvino-int8", "openvino", "int8", ov_int8, runner, verify("openvino-int8", runner, "int8"), {**extra, "inference_precision": "f32"}))
    if result.kept_float_nodes:
        say(f"INT8 keeps {len(result.kept_float_nodes)} node(s) in float: {', '.join(result.kept_float_nodes[:8])}{' ...' if len(result.kept_float_nodes) > 8 else ''}")
    rows = []
    for art in candidates:
        if art.parity.passed:
            artifacts.append(art)
            continue
        what = f"{art.key} agrees with PyTorch on only {art.parity.top1_agreement:.2%} of held-out images (bar {bar:.0%})"
        if options.allow_degraded:
            shout(f"{what}; kept as DEGRADED because of --allow-degraded (the server never picks it by default)")
            artifacts.append(art)
        else:
            shout(f"{what}; it is LEFT OUT of the model directory (--allow-degraded keeps it, marked degraded)")
            for path in art.files:
                path.unlink(missing_ok=True)
            rows.append((art.key, art.parity, "left out (degraded)"))
    if not (root / "openvino" / "int8").exists() or not any((root / "openvino" / "int8").iterdir()):
        shutil.rmtree(root / "openvino" / "int8", ignore_errors=True)
    return rows
