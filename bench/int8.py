"""Weigh INT8 recipes by measurement: what convert ships against the alternatives.

For one checkpoint, every recipe quantizes the same FP32 graph from the same
calibration photos, and is compared with PyTorch on held-out photos: top-1
agreement (overall and in the worst class), max |dp|, the time to quantize, and
batch-1 latency as a ratio to FP32 on the same runtime, measured in the same run.

    python -m bench.int8 [CHECKPOINT] [--photos DIR] [--held-out N]

Without CHECKPOINT, the demo's checkpoint (rebuilt from its seed); without
--photos, procedural lesion photos. NNCF rows (OpenVINO's post-training
quantization, with its fast bias correction) run when `nncf` is importable;
it is not a dependency of the product. On demand, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import instruction_sets
from convert.checkpoint import LoadedModel, load_checkpoint
from convert.export import export_onnx
from convert.images import image_set, jpeg_bytes, load_image_dir
from convert.quantize import Quantizer, Variant
from convert.verify import infer_all, load_runtime

CALIBRATION = 48


@dataclass(frozen=True)
class Recipe:
    name: str
    runtime: str  # "onnxruntime" or "openvino": what runs the quantized graph
    method: str = "MinMax"
    variant: Variant = Variant()
    nncf: bool = False


RECIPES = [
    Recipe("shipped: U8S8, 7-bit weights, float stem", "onnxruntime"),
    Recipe("shipped, run by OpenVINO", "openvino"),
    Recipe("before issue 20: S8S8, 8-bit, stem int8", "onnxruntime",
           variant=Variant(activations="QInt8", reduce_range=False, float_stem=False)),
    Recipe("before issue 20, run by OpenVINO", "openvino",
           variant=Variant(activations="QInt8", reduce_range=False, float_stem=False)),
    Recipe("8-bit weights (saturate without VNNI)", "onnxruntime", variant=Variant(reduce_range=False)),
    Recipe("stem in INT8 too", "onnxruntime", variant=Variant(float_stem=False)),
    Recipe("signed activations (S8S8)", "onnxruntime", variant=Variant(activations="QInt8")),
    Recipe("Percentile", "onnxruntime", method="Percentile"),
    Recipe("Entropy", "onnxruntime", method="Entropy"),
    Recipe("symmetric activations", "onnxruntime", variant=Variant(symmetric_activations=True)),
    Recipe("per-tensor weights", "onnxruntime", variant=Variant(per_channel=False)),
    Recipe("NNCF (bias correction)", "openvino", nncf=True),
]


def photos(directory: Path | None, held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and held-out tensors, reference-preprocessed from encoded photos."""
    if directory is None:
        from convert.demo import PHOTO_SIZE, synthetic_photos

        found = image_set([jpeg_bytes(i) for i in synthetic_photos(CALIBRATION + held_out, 7070, PHOTO_SIZE)], "synthetic")
    else:
        found = load_image_dir(directory)
    if len(found.tensors) < CALIBRATION + 10:
        raise SystemExit(f"--photos: {len(found.tensors)} readable photos; need at least {CALIBRATION + 10}")
    return found.tensors[:CALIBRATION], found.tensors[CALIBRATION : CALIBRATION + held_out]


def latency_ms(run: Callable[[np.ndarray], np.ndarray], tensors: np.ndarray, repeats: int = 20) -> float:
    """Median batch-1 latency."""
    run(tensors[:1])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(tensors[i % len(tensors)][None])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def nncf_quantize(fp32: Path, calibration: np.ndarray, out: Path) -> Path:
    import nncf  # type: ignore[import-not-found]
    import openvino as ov

    model = ov.convert_model(str(fp32))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calibration))
    ov.save_model(quantized, str(out))
    return out


def measure(model: LoadedModel, calibration: np.ndarray, held_out: np.ndarray, work: Path) -> list[dict]:
    fp32 = work / "fp32.onnx"
    export_onnx(model, fp32)
    reference = np.concatenate([model.probabilities(held_out[i : i + 16]) for i in range(0, len(held_out), 16)])
    ref_top = reference.argmax(1)
    quantizer = Quantizer(fp32, work, calibration)
    base = {name: latency_ms(load_runtime(fp32, "onnx" if name == "onnxruntime" else "openvino").infer, held_out)
            for name in ("onnxruntime", "openvino")}
    rows = []
    for recipe in RECIPES:
        start = time.perf_counter()
        if recipe.nncf:
            try:
                path = nncf_quantize(fp32, calibration, work / f"nncf-{len(rows)}.xml")
            except ImportError:
                rows.append({"recipe": recipe.name, "runtime": recipe.runtime, "skipped": "nncf is not installed"})
                continue
        else:
            path = quantizer.quantize(recipe.method, [], recipe.variant)
        seconds = time.perf_counter() - start
        runtime = load_runtime(path, "onnx" if recipe.runtime == "onnxruntime" else "openvino")
        probs = infer_all(runtime.infer, held_out, batch=16)
        top = probs.argmax(1)
        per_class = [float(np.mean(top[ref_top == k] == k)) for k in np.unique(ref_top)]
        ms = latency_ms(runtime.infer, held_out)
        rows.append({"recipe": recipe.name, "runtime": recipe.runtime, "top1": float(np.mean(top == ref_top)),
                     "worst_class": min(per_class), "max_dp": float(np.max(np.abs(probs - reference))),
                     "quantize_s": seconds, "ms": ms, "vs_fp32": ms / base[recipe.runtime]})
    return rows


def table(rows: list[dict], images: int) -> str:
    lines = [f"{'recipe':38} {'runtime':12} {'top-1':>8} {'worst cl':>8} {'max|dp|':>8} {'quant s':>8} "
             f"{'ms/img':>7} {'x FP32':>7}", "-" * 104]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['recipe']:38} {r['runtime']:12} skipped: {r['skipped']}")
            continue
        lines.append(f"{r['recipe']:38} {r['runtime']:12} {r['top1']:8.2%} {r['worst_class']:8.2%} {r['max_dp']:8.3f} "
                     f"{r['quantize_s']:8.1f} {r['ms']:7.1f} {r['vs_fp32']:7.2f}")
    lines.append(f"top-1: agreement with PyTorch on {images} held-out photos; worst cl: the class (by PyTorch's answer) "
                 "agreeing least; ms/img: batch 1, median; x FP32: against the FP32 ONNX on the same runtime, this run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, help="a checkpoint convert accepts (default: the demo's)")
    parser.add_argument("--photos", type=Path, help=f"photos: the first {CALIBRATION} calibrate, the rest are held out")
    parser.add_argument("--held-out", type=int, default=200, help="held-out photos to compare on (default 200)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            import torch

            from convert.demo import make_demo_checkpoint

            checkpoint = work / "demo_checkpoint.pt"
            torch.save(make_demo_checkpoint(), checkpoint)
        model = load_checkpoint(checkpoint)
        calibration, held_out = photos(args.photos, args.held_out)
        rows = measure(model, calibration, held_out, work)
    print(f"{checkpoint.name}: {len(calibration)} calibration photos; CPU: {' '.join(instruction_sets()) or 'no AVX2'}")
    print(table(rows, len(held_out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
