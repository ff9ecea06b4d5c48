"""Proving served paths on this CPU: the version's verification set, run here, before a fast path serves.

What convert measured describes the machine that converted. The same INT8 graph
runs different integer kernels on an AVX2 CPU and an AVX-512 VNNI one, and they
do not round alike (docs/int8.md), so a version converted on one may miss its
bar on another. A version made by this convert carries its verification set
(the clinic's held-out photos as taken, with PyTorch's probabilities, each
hashed in model.json). At the first start of a version on a machine (its
fingerprint: CPU model and flags, an instruction-set cap, the runtime, its
version and settings), every path the settings allow that passed at convert is
run on that set here and held to the same bar. Until then the box serves an
FP32 path that passed its golden self-check (safe first); the lifecycle
switches to the fastest path that passed here once the proof is written (fast
once proven). The proof is cached per version and fingerprint, so later starts
read it, and a path that failed here is never served in `auto`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .. import imaging
from ..errors import ModelError
from ..modeldir import MANIFEST, GoldenImage, Manifest, ServedPath, verify_files
from .runtimes import Runtime, runtime_class

log = logging.getLogger(__name__)

# The instruction sets that change what a CPU's INT8 (and bf16) kernels compute and how fast
# (docs/int8.md): benchmarks and proofs name them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
# oneDNN (OpenVINO's CPU kernels) takes its instruction-set cap from here: a capped process computes as an older CPU.
ISA_CAP_VARIABLE = "ONEDNN_MAX_CPU_ISA"
BATCH = 8  # verification photos per inference: as convert runs them

State = Literal["off", "no set", "pending", "proven"]
IDLE_POLL_S = 0.05  # how often the watch looks for an idle moment


def cpu_info() -> tuple[str, list[str]]:
    """This CPU's model name and flags, from /proc/cpuinfo ("", [] where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", []

    def first(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), "")

    return first("model name"), first("flags").split()


def instruction_sets() -> list[str]:
    """Which of ISA_FLAGS this CPU has (empty where /proc/cpuinfo says none)."""
    flags = set(cpu_info()[1])
    return [f for f in ISA_FLAGS if f in flags]


def fingerprint(runtime: Runtime, runtime_config: Any) -> dict[str, str]:
    """What decides the arithmetic of a served path on this machine; a change means proving again."""
    model, flags = cpu_info()
    running = runtime.describe()
    return {
        "cpu": model,
        "isa": " ".join(f for f in ISA_FLAGS if f in flags),
        "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
        "isa_cap": os.environ.get(ISA_CAP_VARIABLE, ""),
        "runtime": running["runtime"],
        "runtime_version": str(running.get("version", "")),
        "settings_sha256": hashlib.sha256(repr(runtime_config).encode()).hexdigest()[:16],
    }


@dataclass(frozen=True)
class Bar:
    """What a served path must reach on verification photos, overall and in every class PyTorch predicts."""

    min_agreement: float = 0.99
    max_abs_dp: float = 0.05

    def to_json(self) -> dict[str, Any]:
        """model.json's `verification.bar`."""
        return {"top1_agreement": self.min_agreement, "max_abs_dp": self.max_abs_dp, "per_class": True}

    @classmethod
    def from_json(cls, table: Mapping[str, Any]) -> Bar:
        """Read `verification.bar` (the defaults where a manifest gives none)."""
        return cls(float(table.get("top1_agreement", cls.min_agreement)), float(table.get("max_abs_dp", cls.max_abs_dp)))

    def met(self, f: Mapping[str, Any]) -> bool:
        """Whether `figures` meet the bar, overall and in every class."""
        return (f["top1_agreement"] >= self.min_agreement and f["max_abs_dp"] <= self.max_abs_dp
                and all(c["top1_agreement"] >= self.min_agreement and c["max_abs_dp"] <= self.max_abs_dp
                        for c in f["per_class"].values()))


def figures(reference: np.ndarray, probs: np.ndarray, labels: Iterable[str]) -> dict[str, Any]:
    """Agreement with PyTorch's `reference` overall and for each class PyTorch predicts among the photos."""
    ref_top, top = reference.argmax(1), probs.argmax(1)
    dp = np.abs(reference.astype(np.float64) - probs).max(1)
    per_class = {}
    for k, label in enumerate(labels):
        mask = ref_top == k
        if mask.any():
            per_class[label] = {"images": int(mask.sum()), "top1_agreement": float(np.mean(top[mask] == k)),
                                "max_abs_dp": float(dp[mask].max())}
    worst = min(per_class, key=lambda c: (per_class[c]["top1_agreement"], -per_class[c]["max_abs_dp"]), default=None)
    return {
        "images": len(reference),
        "top1_agreement": float(np.mean(top == ref_top)),
        "max_abs_dp": float(dp.max()),
        "median_abs_dp": float(np.median(dp)),
        "worst_class": worst,
        "per_class": per_class,
    }


def summary(f: Mapping[str, Any]) -> str:
    """Figures in a few words: "top-1 98.65%, nv 94%, max |dp| 0.149"."""
    worst = f.get("worst_class")
    cls = f["per_class"].get(worst, {}) if worst else {}
    worst_text = f", {worst} {cls['top1_agreement']:.0%}" if cls and cls["top1_agreement"] < 1.0 else ""
    return f"top-1 {f['top1_agreement']:.2%}{worst_text}, max |dp| {f['max_abs_dp']:.3g}"


@dataclass(frozen=True)
class Proof:
    """What this machine showed for a version's served paths, or why it has not (yet)."""

    state: State
    reason: str
    fingerprint: Mapping[str, str] = field(default_factory=dict)
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # path key -> figures here + "passed"
    pending: tuple[ServedPath, ...] = ()  # the paths to prove (state "pending")
    file: Path | None = None  # where the proof is (or will be) cached

    def failed_here(self, path: ServedPath) -> bool:
        """Whether `path` was run here and missed the bar."""
        result = self.results.get(path.key)
        return result is not None and not result["passed"]

    def apply(self, paths: Iterable[ServedPath], manifest: Manifest, named: bool) -> tuple[ServedPath, ...]:
        """`paths` as this machine may serve them: failed here means failed; while pending, only FP32 counts.

        With a path `named` in the settings (model.artifact), nothing is held back while pending: the
        operator chose it, and its answers are flagged if it fails here.
        """
        def safe(p: ServedPath) -> bool:
            return manifest.artifacts[p.artifact].precision == "fp32" and p.inference_precision == "f32"

        paths = tuple(paths)
        if self.state == "proven":
            return tuple(dataclasses.replace(p, passed=False) if self.failed_here(p) else p for p in paths)
        if self.state == "pending" and not named and any(p.passed and safe(p) for p in paths):
            return tuple(p if safe(p) else dataclasses.replace(p, passed=False) for p in paths)
        return paths

    def describe(self, manifest: Manifest) -> dict[str, Any]:
        """`served_path.proof` in /v1/info: the state, this machine, and both figures of each path run here."""
        convert = {p.key: p for p in manifest.served_paths}
        paths = {}
        for key, result in sorted(self.results.items()):
            there = convert.get(key)
            paths[key] = {
                "passed_here": result["passed"],
                "here": summary(result),
                "converting_machine": (summary(there.figures) if there is not None and "per_class" in there.figures
                                       else None),
                "passed_converting_machine": there.passed if there is not None else None,
                "figures_here": dict(result),
            }
        return {"state": self.state, "reason": self.reason, "fingerprint": dict(self.fingerprint), "paths": paths,
                "file": None if self.file is None else str(self.file)}


def proof_file(cache_dir: Path, manifest: Manifest, machine: Mapping[str, str]) -> Path:
    """The cache file of this version's proof on this machine."""
    digest = hashlib.sha256((manifest.directory / MANIFEST).read_bytes()).hexdigest()
    key = hashlib.sha256(f"{digest} {json.dumps(machine, sort_keys=True)}".encode()).hexdigest()[:16]
    return cache_dir / f"proof-{manifest.name}-{manifest.version}-{key}.json"


def find_proof(manifest: Manifest, candidates: list[ServedPath], machine: Mapping[str, str],
               cache_dir: Path | None) -> Proof:
    """This version's proof on this machine: read from `cache_dir`, or pending (its candidates named), or why none."""
    if cache_dir is None:
        return Proof("off", "model.prove_paths is off: served by the figures of the converting machine")
    if not manifest.verification_set:
        return Proof("no set", f"{manifest.directory / MANIFEST} carries no verification set (made by an older "
                               f"convert): served by the figures of the converting machine; reconvert to prove it here",
                     machine)
    file = proof_file(cache_dir, manifest, machine)
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        results = {str(k): dict(v) for k, v in cached["paths"].items()}
        for result in results.values():  # what /v1/info and the choice read: a damaged file is proven again
            if not (isinstance(result["passed"], bool) and isinstance(result["per_class"], dict)):
                raise TypeError("a path's result is not what prove() writes")
            summary(result)
        if all(p.key in results for p in candidates):
            return Proof("proven", f"proven on this machine at {cached['measured_at']} on "
                                   f"{cached['photos']} verification photos", machine, results, (), file)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("cannot read the proof cached in %s (%s: %s): proving again", file, type(exc).__name__, exc)
    return Proof("pending", f"proving {len(candidates)} path(s) on this machine's "
                            f"{len(manifest.verification_set)} verification photos; FP32 serves until then",
                 machine, {}, tuple(candidates), file)


def prove(manifest: Manifest, proof: Proof, create: Callable[[], Runtime], *, max_batch: int = BATCH,
          cancelled: Callable[[], bool] = lambda: False) -> Proof:
    """Run every pending path on the verification set (one artifact loaded at a time); cache and return the proof.

    Blocking, for a thread of its own: decoding and inference here compete with serving
    for the CPU for a minute or so, once per version and machine. When `cancelled()` turns
    true (shutdown), it stops within one batch and returns `proof` unchanged.
    """
    bar = Bar.from_json(manifest.verification.get("bar", {}))
    photos = manifest.verification_set
    verify_files(manifest.directory, {p.file: p.sha256 for p in photos if p.sha256}, "verification photo")
    reference = np.array([p.probabilities for p in photos], dtype=np.float64)
    started = time.monotonic()
    tensors = {}
    for mode in sorted({p.decode for p in proof.pending}):
        if cancelled():
            return proof
        tensors[mode] = np.stack([_decode(manifest, p, mode) for p in photos])
    results: dict[str, dict[str, Any]] = {}
    for artifact in sorted({p.artifact for p in proof.pending}):
        verify_files(manifest.directory, manifest.artifacts[artifact].files, f"artifact {artifact}")
        runtime = create()
        try:
            runtime.load(manifest.directory / manifest.artifacts[artifact].file)
            for path in (p for p in proof.pending if p.artifact == artifact):
                batch, answers = tensors[path.decode], []
                for i in range(0, len(batch), max_batch):
                    if cancelled():
                        return proof
                    answers.append(runtime.infer(batch[i : i + max_batch]))
                f = figures(reference, np.concatenate(answers).astype(np.float64), manifest.labels)
                results[path.key] = {**f, "passed": bar.met(f)}
        finally:
            runtime.close()
    proven = dataclasses.replace(proof, state="proven", results=results, pending=(),
                                 reason=f"proven on this machine just now on {len(photos)} verification photos "
                                        f"in {time.monotonic() - started:.0f} s")
    for key, result in sorted(results.items()):
        there = next((p for p in manifest.served_paths if p.key == key), None)
        convert_text = f" ({summary(there.figures)})" if there is not None and "per_class" in there.figures else ""
        if result["passed"]:
            log.info("proof: %s passes on this CPU (%s); it passed on the converting machine%s", key,
                     summary(result), convert_text)
        else:
            log.warning("proof: %s passed on the converting machine%s but FAILS on this CPU (%s): never served "
                        "here", key, convert_text, summary(result))
    if proof.file is not None:
        _write(proof.file, {"fingerprint": dict(proof.fingerprint), "measured_at": _now(), "photos": len(photos),
                            "bar": bar.to_json(), "paths": results})
    return proven


def _decode(manifest: Manifest, photo: GoldenImage, mode: imaging.DecodeMode) -> np.ndarray:
    """A verification photo as `mode` decodes it; a crop (set_form "crops") as is, whatever the mode."""
    path = manifest.directory / photo.file
    spec = manifest.preprocessing
    try:
        if manifest.verification.get("set_form") == "crops":
            with Image.open(path) as image:
                crop = np.asarray(image.convert("RGB"))
            if crop.shape != (spec.crop, spec.crop, 3):
                raise ValueError(f"{crop.shape[1]}x{crop.shape[0]}, not the {spec.crop}x{spec.crop} crop")
            return imaging.normalize(crop, spec)
        return imaging.decode(path.read_bytes(), spec, max_pixels=1 << 40, mode=mode).tensor
    except Exception as exc:
        raise ModelError(f"{path}: cannot decode this verification photo ({exc})") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write(file: Path, document: Mapping[str, Any]) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(file.name + f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(document, indent=1), encoding="utf-8")
        temporary.replace(file)
    except OSError as exc:  # serving does not depend on the cache: the next start proves again
        log.warning("cannot cache the proof in %s: %s", file, exc)


# -- the live parity watch -------------------------------------------------------------------------

WatchState = Literal["off", "watching", "reference", "fell back"]


def reference_path(manifest: Manifest, runtime: str) -> ServedPath | None:
    """The path the watch compares with: an FP32 artifact decoded whole at f32 on `runtime`, that passed; of the
    runtime's own format first (OpenVINO's IR before an ONNX file), then the fastest."""
    formats = runtime_class(runtime).formats
    exact = [p for p in manifest.served_paths if p.runtime == runtime and p.decode == "exact" and p.passed
             and p.inference_precision == "f32" and manifest.artifacts[p.artifact].precision == "fp32"
             and manifest.artifacts[p.artifact].format in formats]
    return min(exact, key=lambda p: (formats.index(manifest.artifacts[p.artifact].format), p.ms_per_image is None,
                                     p.ms_per_image or 0.0, p.key), default=None)


@dataclass
class _Sample:
    model: Any  # the LoadedModel that answered (inference/model.py imports this module)
    data: bytes
    served: np.ndarray  # the probabilities the caller got


class ParityWatch:
    """Re-run 1 in `every` answered photos on the reference path in idle time, and keep a rolling agreement.

    Serving never waits for it: a sample is dropped when the bounded queue is full, a sample
    runs only when the scheduler has nothing to do, on a thread of its own, and nothing
    is written anywhere. Once the last `window` samples miss the bar (top-1 agreement and max
    |dp| over the window; per class is left to the proof, windows are too small), it logs
    once and asks the lifecycle to serve the reference path until the next reload.
    """

    def __init__(self, *, every: int, window: int, queue_size: int, idle: Callable[[], bool],
                 create: Callable[[], Runtime], executor: Any, fall_back: Callable[[str], Any]) -> None:
        self.every = every
        self.window = window
        self._idle = idle  # the scheduler has nothing queued, announced or running
        self._create = create  # a runtime for the reference path
        self._executor = executor  # one thread of its own
        self._fall_back = fall_back  # async: serve the reference path (the lifecycle's FALLBACK reload)
        self._queue: asyncio.Queue[_Sample] = asyncio.Queue(queue_size)
        self._answers = 0
        self._results: collections.deque[tuple[bool, float]] = collections.deque(maxlen=window)
        self._reference: tuple[Path, Runtime] | None = None  # (version directory, its loaded reference runtime)
        self.samples = 0  # compared, since start
        self.dropped = 0  # sampled but the queue was full
        self.fell_back = ""  # why, once it fell back (until the next version or reload)
        self._model: Any = None

    def offer(self, model: Any, data: bytes, served: np.ndarray) -> None:
        """Called with every answered photo (on the event loop; never blocks); queues 1 in `every`."""
        if self.every <= 0 or self.state(model) != "watching":
            return
        self._answers += 1
        if self._answers % self.every:
            return
        try:
            self._queue.put_nowait(_Sample(model, data, served))
        except asyncio.QueueFull:
            self.dropped += 1

    def state(self, model: Any) -> WatchState:
        """What the watch does for `model`: off, watching, nothing to do (it serves the reference), or fell back."""
        if self.every <= 0:
            return "off"
        if self.fell_back:
            return "fell back"
        ref = reference_path(model.manifest, model.served.runtime)
        return "reference" if ref is None or ref.key == model.served.key else "watching"

    def swapped(self, model: Any, *, fallback: bool = False) -> None:
        """A model serves now (any reload): a new window; any reload but the fallback itself ends the fallback."""
        if not fallback:
            self.fell_back = ""
        self._model = model
        self._results.clear()

    def describe(self, model: Any) -> dict[str, Any]:
        """`served_path.watch` in /v1/info and the status page."""
        ref = reference_path(model.manifest, model.served.runtime)
        agreement = (sum(a for a, _ in self._results) / len(self._results)) if self._results else None
        return {"state": self.state(model), "every": self.every, "window": self.window,
                "reference": None if ref is None else ref.key, "samples": self.samples,
                "in_window": len(self._results), "top1_agreement": agreement,
                "max_abs_dp": max((dp for _, dp in self._results), default=None), "dropped": self.dropped,
                "fell_back": self.fell_back or None}

    async def run(self) -> None:
        """Take samples until cancelled; each waits for an idle moment."""
        loop = asyncio.get_running_loop()
        while True:
            sample = await self._queue.get()
            if sample.model is not self._model or self.state(sample.model) != "watching":
                continue  # answered by a version no longer served
            while not self._idle():
                await asyncio.sleep(IDLE_POLL_S)
            try:
                reference = await loop.run_in_executor(self._executor, self._reference_answer, sample)
            except Exception as exc:  # a runtime's own error: the watch says so, serving goes on
                log.error("live parity watch: the reference path failed (%s: %s); sample skipped",
                          type(exc).__name__, exc)
                continue
            if sample.model is not self._model:
                continue
            self._record(sample, reference)

    def _record(self, sample: _Sample, reference: np.ndarray) -> None:
        served = sample.served.astype(np.float64)
        self._results.append((int(served.argmax()) == int(reference.argmax()),
                              float(np.abs(served - reference).max())))
        self.samples += 1
        if len(self._results) < self.window or self.fell_back:
            return
        bar = Bar.from_json(sample.model.manifest.verification.get("bar", {}))
        agreement = sum(a for a, _ in self._results) / len(self._results)
        worst = max(dp for _, dp in self._results)
        if agreement >= bar.min_agreement and worst <= bar.max_abs_dp:
            return
        ref = reference_path(sample.model.manifest, sample.model.served.runtime)
        assert ref is not None
        self.fell_back = (f"{sample.model.served.key} agreed with the reference path {ref.key} on {agreement:.1%} of "
                          f"the last {len(self._results)} sampled photos, max |dp| {worst:.3g} (bar: top-1 >= "
                          f"{bar.min_agreement:.0%}, max |dp| <= {bar.max_abs_dp:g})")
        log.warning("live parity watch: %s: falling back to %s until a reload", self.fell_back, ref.key)
        asyncio.get_running_loop().create_task(self._fall_back(self.fell_back), name="parity-fallback")

    def _reference_answer(self, sample: _Sample) -> np.ndarray:
        """The reference path's probabilities for the sample (blocking; the watch's own thread)."""
        manifest = sample.model.manifest
        ref = reference_path(manifest, sample.model.served.runtime)
        assert ref is not None
        if self._reference is None or self._reference[0] != manifest.directory:
            self.close()
            artifact = manifest.artifacts[ref.artifact]
            verify_files(manifest.directory, artifact.files, f"artifact {artifact.key}")
            runtime = self._create()
            runtime.load(manifest.directory / artifact.file)
            self._reference = (manifest.directory, runtime)
        tensor = imaging.decode(sample.data, manifest.preprocessing, max_pixels=1 << 40, mode="exact").tensor
        return self._reference[1].infer(tensor[np.newaxis])[0].astype(np.float64)

    def close(self) -> None:
        """Release the reference runtime (blocking)."""
        if self._reference is not None:
            self._reference[1].close()
            self._reference = None
