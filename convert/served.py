"""Measuring served paths: each artifact run the way the server runs it, against PyTorch.

A served path is an artifact, a decode mode of the server's own `imaging.decode`
and, on OpenVINO, an inference precision. Each one is measured on the verification
photos as encoded files at the size they were taken and as copies at the sizes phones
send, through the appliance's own runtime classes, and on the golden images the
server self-checks with at every start.
"""

from __future__ import annotations

import dataclasses
import io
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from appliance import imaging
from appliance.inference.proof import Bar as Bar, figures
from appliance.inference.runtimes import Runtime, runtime_class
from appliance.modeldir import RUNTIME_OF_FORMAT, ServedPath

from .images import jpeg_bytes, map_threads, reference_tensor
from .verify import infer_all, runtime_for

# The bar a served path must meet, overall and in every class (convert options).
MIN_AGREEMENT = 0.99
MAX_ABS_DP = 0.05
# Fewer verification photos than this and the figures carry a warning.
MIN_VERIFICATION_PHOTOS = 30
# Copies of verification photos at shorter sides the fast decode reads at 1/2 (1050) and
# 1/4 (2112, and a 12 MP phone photo's 3024), at most MAX_COPIES in all.
PHONE_SHORT_SIDE = 3024
COPY_SHORT_SIDES = (1050, 2112, PHONE_SHORT_SIDE)
MAX_COPIES = 48
SENSOR_NOISE = 4.0  # Gaussian noise, in 8-bit levels, on the copies
COPY_SEED = 9_000
NOISE_ROWS = 128
# Self-check tolerance: what convert measured on the golden images plus this margin
# (another CPU's kernels, above all INT8 and bf16 ones, round differently).
SELFCHECK_MARGIN = {"fp32": 0.01, "fp16": 0.02, "int8": 0.05, "bf16": 0.05}
LATENCY_RUNS = 5
BATCH = 8


@dataclass(frozen=True)
class Photo:
    """One encoded photo the server could receive: one of the clinic's, or a copy of one at another size."""

    name: str
    data: bytes
    copy_short_side: int | None = None  # a copy made at this shorter side, not one of the clinic's own

    @property
    def is_copy(self) -> bool:
        return self.copy_short_side is not None


@dataclass(frozen=True)
class Row:
    """One row of the table convert prints: a measured served path and a note on it."""

    path: ServedPath
    note: str = ""


@dataclass(frozen=True)
class Candidate:
    """An artifact as written to the model directory."""

    key: str
    format: str
    precision: str
    file: Path
    # Its probabilities on the reference tensors of the photos, where convert's parity check already ran them.
    exact_probabilities: np.ndarray | None = None


def phone_size_copy(image: Image.Image, seed: int, short_side: int = PHONE_SHORT_SIDE) -> bytes:
    """`image` resized to a shorter side of `short_side` with sensor-like noise, as a JPEG (quality 92)."""
    w, h = image.size
    f = short_side / min(w, h)
    big = np.asarray(image.convert("RGB").resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC))
    rng = np.random.default_rng(seed)
    noisy = np.empty_like(big)
    # A band of rows at a time, drawing the noise in the order one draw for the whole image would
    # (the same bytes as `clip(big + noise + 0.5)`, in a fraction of the memory and time).
    for top in range(0, len(big), NOISE_ROWS):
        rows = slice(top, top + NOISE_ROWS)
        band = rng.normal(0, SENSOR_NOISE, big[rows].shape).astype(np.float32)
        band += big[rows]
        band += 0.5
        noisy[rows] = np.clip(band, 0, 255, out=band)
    return jpeg_bytes(Image.fromarray(noisy))


def with_phone_size_copies(photos: list[Photo]) -> list[Photo]:
    """`photos`, plus copies of the first ones at each size class the fast decode treats differently.

    The fast decode's error depends on the scale it decodes at (1/2 from about 1 MP,
    1/4 from 4 MP, 12 MP phone photos included), whatever size the clinic's photos were
    taken at; nothing is tuned on a decode mode, so each copy is one more honest sample
    of it. Copies are resized (up or down) with sensor-like noise and carry no EXIF.
    """
    def copies(index: int) -> list[Photo]:
        photo = photos[index]
        with Image.open(io.BytesIO(photo.data)) as image:
            oriented = ImageOps.exif_transpose(image)  # as the server sees it; the copies carry no EXIF
            return [Photo(f"{photo.name} ({side} px)", phone_size_copy(oriented, COPY_SEED + index, side), side)
                    for side in COPY_SHORT_SIDES]

    originals = range(min(len(photos), MAX_COPIES // len(COPY_SHORT_SIDES)))
    return photos + [copy for made in map_threads(copies, originals) for copy in made]


def reference_tensors(photos: list[Photo]) -> np.ndarray:
    """The reference preprocessing of each photo's bytes (what PyTorch is given)."""
    return np.stack(list(map_threads(lambda p: reference_tensor(io.BytesIO(p.data)), photos)))


@dataclass
class Decoded:
    """Every photo and golden image through one decode mode of the server."""

    mode: imaging.DecodeMode
    tensors: np.ndarray
    golden: np.ndarray
    ms_per_image: float


def decode_all(photos: list[Photo], golden: list[bytes], spec: imaging.Preprocessing, mode: imaging.DecodeMode) -> Decoded:
    """Decode with the server's own `imaging.decode` in `mode`, timing each photo."""
    def run(items: list[bytes]) -> Iterator[tuple[np.ndarray, float]]:
        for data in items:
            start = time.perf_counter()
            tensor = imaging.decode(data, spec, max_pixels=1 << 40, mode=mode).tensor
            yield tensor, time.perf_counter() - start

    measured = list(run([p.data for p in photos]))
    golden_tensors = np.stack([t for t, _ in run(golden)])
    # 12 MP phone photos are what the server will mostly decode; time those when there are some.
    big = [s for (_, s), p in zip(measured, photos, strict=True) if p.copy_short_side == PHONE_SHORT_SIDE] or [s for _, s in measured]
    return Decoded(mode, np.stack([t for t, _ in measured]), golden_tensors, 1000 * statistics.median(big))


def precisions_for(candidate: Candidate, bf16: bool) -> list[str]:
    """The inference precisions this artifact is served at: f32, and bf16 for FP32 where the CPU has it natively."""
    config_class = runtime_class(RUNTIME_OF_FORMAT[candidate.format]).Config
    if bf16 and candidate.precision == "fp32" and "inference_precision" in {f.name for f in dataclasses.fields(config_class)}:
        return ["f32", "bf16"]
    return ["f32"]


def latency_ms(runtime: Runtime, tensor: np.ndarray) -> float:
    """Median time of one batch-1 inference, after a first run that compiles and allocates."""
    runtime.infer(tensor[None])
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        runtime.infer(tensor[None])
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def photo_figures(reference: np.ndarray, probs: np.ndarray, labels: list[str], photos: list[Photo]) -> dict:
    """Agreement with PyTorch overall and in each class (the appliance's own `figures`), and how many are copies."""
    f = figures(reference, probs, labels)
    return {"images": f.pop("images"), "copies": sum(p.is_copy for p in photos), **f}


def passes(f: dict, bar: Bar) -> bool:
    """The bar, overall and in every class; and no golden image may change its answer."""
    return bar.met(f) and f["golden_top1_agreement"] == 1.0


def measure_paths(
    candidates: list[Candidate],
    photos: list[Photo],
    reference: np.ndarray,
    golden: tuple[list[bytes], np.ndarray],
    spec: imaging.Preprocessing,
    labels: list[str],
    bar: Bar,
    *,
    bf16: bool,
    say: Callable[[str], None] = print,
    reference_tensors: np.ndarray | None = None,
) -> list[ServedPath]:
    """Every served path of every candidate, measured against `reference` (PyTorch's probabilities).

    A candidate's f32 path reuses its `exact_probabilities` (on `reference_tensors`, the photos as PyTorch
    was given them) where a decode mode gives those very tensors, as the exact decode does for the photos
    a phone sends: the same artifact on the same runtime with the same settings, given the same input.
    """
    golden_bytes, golden_reference = golden
    decoded = [decode_all(photos, golden_bytes, spec, mode) for mode in imaging.DECODE_MODES]
    paths = []
    for candidate in candidates:
        for precision in precisions_for(candidate, bf16):
            runtime = runtime_for(candidate.format, precision)
            runtime.load(candidate.file)
            try:
                latency = latency_ms(runtime, decoded[0].tensors[0])
                for d in decoded:
                    same = reference_tensors is not None and np.array_equal(d.tensors, reference_tensors)
                    probs = candidate.exact_probabilities if same and precision == "f32" else None
                    if probs is None:
                        probs = infer_all(runtime.infer, d.tensors, batch=BATCH)
                    f = photo_figures(reference, probs, labels, photos)
                    golden_probs = infer_all(runtime.infer, d.golden, batch=BATCH)
                    golden_dp = float(np.abs(golden_probs - golden_reference).max())
                    f["golden_max_abs_dp"] = golden_dp
                    f["golden_top1_agreement"] = float(np.mean(golden_probs.argmax(1) == golden_reference.argmax(1)))
                    margin = SELFCHECK_MARGIN["bf16" if precision == "bf16" else candidate.precision]
                    path = ServedPath(candidate.key, runtime.name, d.mode, precision, passes(f, bar),
                                      round(golden_dp + margin, 6), round(d.ms_per_image + latency, 1), f)
                    say(f"served path {path.key}: top-1 {f['top1_agreement']:.2%}, max |dp| {f['max_abs_dp']:.3g}")
                    paths.append(path)
            finally:
                runtime.close()
    return paths


def format_paths(rows: list[Row], bar: Bar) -> str:
    """The table convert prints: one row per served path."""
    header = (f"{'served path':<26} {'photos':>7} {'top-1':>8} {'max|dp|':>8} {'med|dp|':>8} "
              f"{'worst class':>16} {'ms/img':>7}  result")
    lines = [header, "-" * len(header)]
    for row in rows:
        p, note = row.path, row.note
        f = p.figures
        photos = f"{f['images'] - f['copies']}+{f['copies']}" if f["copies"] else str(f["images"])
        worst = f["worst_class"]
        worst_text = f"{worst} {f['per_class'][worst]['top1_agreement']:.0%}" if worst else "-"
        result = "pass" if p.passed else "FAIL"
        lines.append(f"{p.key:<26} {photos:>7} {f['top1_agreement']:>8.2%} {f['max_abs_dp']:>8.2e} "
                     f"{f['median_abs_dp']:>8.1e} {worst_text:>16} {p.ms_per_image:>7.1f}  {result}{'  ' + note if note else ''}")
    lines.append(f"bar: top-1 >= {bar.min_agreement:.0%} and max |dp| <= {bar.max_abs_dp:g} overall and in every class "
                 f"(--min-agreement, --max-dp);\nphotos: verification photos + their copies at phone sizes; ms/img: decode + inference of one photo")
    return "\n".join(lines)
