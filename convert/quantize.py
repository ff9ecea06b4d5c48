"""Static INT8 (QDQ, per-channel weights) with ONNX Runtime, and the search that makes it trustworthy.

The recipe leaves no x86 CPU's kernels room to saturate (docs/int8.md): without VNNI, INT8
kernels multiply unsigned 8-bit activations by signed weights in pairs summed into 16 bits
(pmaddubsw), which saturates when both products are large. Weights limited to 7 bits keep
every pair below the limit (2 x 255 x 64 = 32,640 <= 32,767), so the accumulations are
exact on SSE4.1, AVX2, AVX-512 and VNNI alike; rounding between layers may still differ a
little from kernel to kernel, which only measuring on the box itself can rule out. The stem
(the layers reading the image) stays in float: its input fills the whole 8-bit range, which
is where the rounding and, with 8-bit weights, the saturation hurt most.
Activations are unsigned (U8S8), the pairing ONNX Runtime's x86 kernels are fast at.

Plain static INT8 is not always good enough (a deep network with random or fragile
features can lose most of its top-1 agreement), so when the first try misses the bar:
1. try every calibration method ONNX Runtime offers (MinMax, Entropy, Percentile);
2. rank nodes by how much quantization error each one adds (FP32 vs QDQ activations,
   ONNX Runtime's qdq_loss_debug) and keep the smallest prefix of that ranking in float
   that meets the bar (exponential, then binary search over the prefix length).
Calibration ranges are computed once per method and cached, so each search step only
re-quantizes and re-measures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from tqdm import tqdm

from appliance.modeldir import INPUT_NAME

METHODS = ("MinMax", "Entropy", "Percentile")
CALIBRATION_BATCH = 8
SENSITIVITY_IMAGES = 4
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class ArrayReader(CalibrationDataReader):
    """Feeds preprocessed images to the calibrator in batches of up to CALIBRATION_BATCH, with a progress bar.

    The calibrator is handed one batch per `collect_data` call (`set_range`, driven by
    ONNX Runtime's CalibStridedMinMax option): the histogram calibrators stack every
    batch of one call into one array, which fails on a ragged last batch, and they hold
    every intermediate tensor of the call in memory (about 100 MB a ResNet50 image).
    """

    def __init__(self, tensors: np.ndarray, desc: str | None = None):
        self._tensors = tensors
        self._batches = range(0, len(tensors), CALIBRATION_BATCH)
        self._next = iter(self._batches)
        self._bar = tqdm(total=len(tensors), desc=desc, unit="img", leave=False, disable=desc is None)

    def get_next(self) -> dict | None:
        start = next(self._next, None)
        if start is None:
            return None
        batch = np.ascontiguousarray(self._tensors[start : start + CALIBRATION_BATCH])
        self._bar.update(len(batch))
        if self._bar.n >= len(self._tensors):
            self._bar.close()
        return {INPUT_NAME: batch}

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only batches [start_index, end_index) next (ONNX Runtime's strided calibration)."""
        self._next = iter(self._batches[start_index:end_index])

    def __len__(self) -> int:
        return len(self._batches)


@dataclass
class Attempt:
    """One quantized candidate and how it agreed with PyTorch on the tuning images."""

    method: str
    kept_float_nodes: list[str]
    agreement: float

    def to_json(self) -> dict:
        return {"method": self.method, "kept_float_nodes": len(self.kept_float_nodes), "top1_agreement": self.agreement}


@dataclass
class Int8Result:
    """The INT8 model chosen, how it was found, and whether it meets the bar."""

    path: Path
    method: str
    kept_float_nodes: list[str]
    agreement: float
    passed: bool
    attempts: list[Attempt] = field(default_factory=list)
    fp32_under_noise: float | None = None  # FP32's agreement with itself under sub-INT8 input noise, when probed
    worst_nodes: list[str] = field(default_factory=list)  # where quantization error grows most, when searched
    float_stem: list[str] = field(default_factory=list)  # the stem, in float by the recipe (not searched for)
    exact_agreement: float | None = None  # the chosen model's agreement with exact arithmetic, when it failed


@dataclass(frozen=True)
class Variant:
    """ONNX Runtime static-quantization settings; the defaults are what convert ships.

    The others exist to be weighed against it (`python -m bench.int8`).
    """

    activations: str = "QUInt8"  # or "QInt8"; unsigned is ONNX Runtime's fast x86 path (U8S8), signed its slow one
    symmetric_activations: bool = False
    per_channel: bool = True
    reduce_range: bool = True  # 7-bit weights: no int16 saturation on CPUs without VNNI (module docstring)
    float_stem: bool = True  # the layers reading the image stay in float

    @property
    def weight_bits(self) -> int:
        return 7 if self.reduce_range else 8


class Quantizer:
    """Quantizes one FP32 graph repeatedly with cached calibration ranges."""

    def __init__(self, fp32: Path, work: Path, calibration: np.ndarray):
        self.work = work
        self.calibration = calibration
        self.prep = work / "prep.onnx"
        # Shape inference plus graph fusions (Conv+BN, ...) before quantization, as ORT advises.
        quant_pre_process(str(fp32), str(self.prep))
        graph = onnx.load(str(self.prep), load_external_data=False).graph
        self.nodes = [n for n in graph.node]
        # Softmax stays in float: its output is the answer and the quantization grid would
        # round small probabilities to a handful of levels.
        self.always_float = [n.name for n in graph.node if n.op_type == "Softmax"]
        self.stem = stem_nodes(graph)
        self._count = 0
        # After sensitivity_ranking: the nodes adding the most quantization error, "name (Op, N dB)".
        self.worst: list[str] = []

    def quantize(self, method: str, keep: list[str], variant: Variant = Variant()) -> Path:
        """A QDQ model calibrated with `method`, with the `keep` nodes left in float."""
        self._count += 1
        out = self.work / f"int8-{self._count}.onnx"
        cache = self.work / f"calibration-{method}.json"
        reader = None if cache.exists() else ArrayReader(self.calibration, desc=f"calibrating ({method})")
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)  # ORT logs advice at WARNING through the root logger
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                # The histogram calibrators print a line per batch on stdout, which carries the parity table.
                quantize_static(
                    str(self.prep),
                    str(out),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=variant.per_channel,
                    reduce_range=variant.reduce_range,
                    activation_type=QuantType[variant.activations],
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod[method],
                    nodes_to_exclude=self.always_float + (self.stem if variant.float_stem else []) + list(keep),
                    calibration_cache_path=str(cache),
                    # One batch per collect: bounded memory, and ragged last batches work (see ArrayReader).
                    extra_options={"CalibStridedMinMax": 1, "ActivationSymmetric": variant.symmetric_activations},
                )
        finally:
            logger.setLevel(level)
        return out

    def sensitivity_ranking(self, qdq: Path) -> list[str]:
        """Node names, the ones that add the most quantization error first."""
        from onnxruntime.quantization.qdq_loss_debug import (
            collect_activations,
            compute_activation_error,
            create_activation_matching,
            modify_model_output_intermediate_tensors,
        )

        aug_float, aug_qdq = self.work / "sens-float.onnx", self.work / "sens-qdq.onnx"
        modify_model_output_intermediate_tensors(str(self.prep), str(aug_float))
        modify_model_output_intermediate_tensors(str(qdq), str(aug_qdq))
        sample = self.calibration[:SENSITIVITY_IMAGES]
        float_acts = collect_activations(str(aug_float), ArrayReader(sample))
        qdq_acts = collect_activations(str(aug_qdq), ArrayReader(sample))
        errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts), _sqnr)
        del float_acts, qdq_acts
        sqnr = {name: err["xmodel_err"] for name, err in errors.items() if "xmodel_err" in err}
        drops: list[tuple[float, int, str]] = []
        for order, node in enumerate(self.nodes):
            # Only nodes with weights are worth keeping in float: excluding a Relu or an Add
            # from quantization barely changes the error (measured on the demo ResNet50).
            if node.name in self.always_float or node.name in self.stem or node.op_type not in WEIGHTED_OPS:
                continue
            outs = [sqnr[o] for o in node.output if o in sqnr]
            if not outs:
                continue
            ins = [sqnr[i] for i in node.input if i in sqnr]
            # A node's own contribution: how much worse its output is than its worst input.
            # An output that is zero in float (a zero-initialised residual branch) has no
            # meaningful SQNR: nothing to gain from keeping that node in float.
            drop = (min(ins) if ins else 100.0) - min(outs)
            if not math.isfinite(drop):
                drop = -math.inf
            drops.append((drop, order, node.name))
        drops.sort(key=lambda d: (-d[0], d[1]))
        ranked = [name for _, _, name in drops]
        ops = {n.name: n.op_type for n in self.nodes}
        self.worst = [f"{name} ({ops[name]}, {drop:.1f} dB)" for drop, _, name in drops[:3] if math.isfinite(drop)]
        # The classifier goes first: with the stem (float already) it is the classic sensitive pair.
        weighted = [n.name for n in self.nodes if n.op_type in WEIGHTED_OPS and n.name not in self.always_float]
        front = [name for name in weighted[-1:] if name not in self.stem]
        return front + [name for name in ranked if name not in front]


def stem_nodes(graph: onnx.GraphProto) -> list[str]:
    """The weighted nodes that read the image: reached from the graph's input through no other weighted node."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stem: list[str] = []
    seen: set[str] = set()
    frontier = [i.name for i in graph.input]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in WEIGHTED_OPS:
                stem.append(node.name)
            else:
                frontier.extend(node.output)
    return stem


def quantize_int8(
    fp32: Path,
    work: Path,
    calibration: np.ndarray,
    evaluate: Callable[[Path], float],
    *,
    bar: float,
    methods: tuple[str, ...] = METHODS,
    fragility: Callable[[], float] | None = None,
    say: Callable[[str], None] = print,
) -> Int8Result:
    """Find the INT8 model with the fewest nodes kept in float whose agreement meets `bar`.

    When no calibration method meets it, `fragility` (FP32's agreement with itself when the
    input moves by less than INT8 rounds it) decides whether a search can help at all: a
    network whose FP32 answers already flip that often sits on near-ties that any INT8
    graph flips too (measured: 75% for a fragile ResNet50 whose best INT8 reached 78%).
    """
    quantizer = Quantizer(fp32, work, calibration)
    attempts: list[Attempt] = []
    best: tuple[Attempt, Path] | None = None

    def attempt(method: str, keep: list[str]) -> tuple[Attempt, Path]:
        nonlocal best
        path = quantizer.quantize(method, keep)
        result = Attempt(method, list(keep), evaluate(path))
        attempts.append(result)
        if best is None or _better(result, best[0], bar):
            best = (result, path)
        return result, path

    plain: list[Attempt] = []
    for method in methods:
        result, path = attempt(method, [])
        say(f"INT8 {method}: top-1 agreement {result.agreement:.2%}")
        plain.append(result)
        if result.agreement >= bar:
            return Int8Result(path, method, [], result.agreement, True, attempts, float_stem=quantizer.stem)

    method = max(plain, key=lambda a: a.agreement).method
    assert best is not None
    steady = fragility() if fragility is not None else None
    if steady is not None and steady < bar:
        say(f"INT8 misses the {bar:.0%} bar, and FP32 itself keeps its answer on only {steady:.2%} of the photos "
            f"under input noise smaller than INT8's rounding: no INT8 can meet the bar; not searching")
        return Int8Result(best[1], best[0].method, [], best[0].agreement, False, attempts, steady,
                           float_stem=quantizer.stem)
    say(f"INT8 misses the {bar:.0%} bar with every calibration method; searching for nodes to keep in float ({method})")
    ranking = quantizer.sensitivity_ranking(quantizer.quantize(method, []))
    passes: dict[int, bool] = {0: False}

    def check(k: int) -> bool:
        if k not in passes:
            result, _ = attempt(method, ranking[:k])
            say(f"INT8 {method}, {k} node(s) in float: top-1 agreement {result.agreement:.2%}")
            passes[k] = result.agreement >= bar
        return passes[k]

    k = 1
    while k < len(ranking) and not check(k):
        k *= 2
    hi = min(k, len(ranking))
    if not check(hi):
        assert best is not None
        return Int8Result(best[1], best[0].method, best[0].kept_float_nodes, best[0].agreement, False, attempts,
                          steady, quantizer.worst, quantizer.stem)
    lo = max(hi // 2, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if check(mid):
            hi = mid
        else:
            lo = mid
    chosen = next(a for a in reversed(attempts) if a.method == method and len(a.kept_float_nodes) == hi)
    assert best is not None
    path = best[1] if best[0] is chosen else quantizer.quantize(method, ranking[:hi])
    return Int8Result(path, method, ranking[:hi], chosen.agreement, True, attempts, float_stem=quantizer.stem)


def exact_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The QDQ model run as written, without ONNX Runtime fusing it into INT8 kernels: each
    quantize-dequantize pair rounds exactly and the layers between run in float, so its answers
    are the quantized model's own on any CPU (fake quantization)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _sqnr(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio in dB; NaN when the reference is all zeros."""
    left = np.concatenate([np.ravel(a) for a in reference]).astype(np.float64)
    right = np.concatenate([np.ravel(a) for a in other]).astype(np.float64)
    signal = float(np.linalg.norm(left))
    if signal < 1e-12:
        return math.nan
    return 20 * math.log10(signal / max(float(np.linalg.norm(left - right)), 1e-12))


def _better(a: Attempt, b: Attempt, bar: float) -> bool:
    """Passing beats failing; among passing, fewer float nodes; among failing, higher agreement."""
    a_ok, b_ok = a.agreement >= bar, b.agreement >= bar
    if a_ok != b_ok:
        return a_ok
    if a_ok:
        return len(a.kept_float_nodes) < len(b.kept_float_nodes)
    return a.agreement > b.agreement
