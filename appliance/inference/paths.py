"""Choosing the served path (an artifact, a decode mode and an inference precision) among those `convert` measured.

What the clinic gets is not the artifact alone: how a photo is decoded (imaging's
"fast" DCT-scaled JPEG decode or its "exact" whole decode) and, on OpenVINO, the
inference precision move the probabilities too. `convert` runs each combination the
way the server does, on the clinic's verification photos, against PyTorch, and writes
the figures to model.json's `served_paths`. The server serves the fastest path that
met the bar among those the configured runtime and settings allow; `modeldir.ServedPath`
is one path as model.json records it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import ModelError
from ..modeldir import DECODE_MODES, Artifact, ServedPath


def legacy_paths(artifacts: Iterable[Artifact], runtimes: Mapping[str, tuple[str, ...]]) -> list[ServedPath]:
    """Paths for a manifest of format 1, which measured artifacts only (on the reference decode).

    Every runtime that loads the format may serve it, with either decode, as before
    served paths existed; `auto` ranks them by precision. Reconverting measures them.
    """
    return [
        ServedPath(a.key, runtime, mode, "f32", not a.degraded, a.selfcheck_max_abs_dp)
        for a in artifacts
        for runtime, formats in runtimes.items() if a.format in formats
        for mode in DECODE_MODES
    ]


@dataclass(frozen=True)
class Choice:
    """The served path and why it was chosen (for the log, /v1/info and the status page)."""

    path: ServedPath
    reason: str
    degraded: bool = False


@dataclass(frozen=True)
class Wanted:
    """What the configuration asks for: the runtime, its inference precision, the artifact and decode mode."""

    runtime: str
    precision: str
    artifact: str = "auto"
    decode: str = "auto"

    def allows(self, path: ServedPath) -> bool:
        """Whether these settings would serve `path`."""
        return (path.runtime == self.runtime and path.inference_precision == self.precision
                and self.artifact in ("auto", path.artifact) and self.decode in ("auto", path.decode))

    def changes_for(self, path: ServedPath) -> str:
        """The settings that would serve `path` instead."""
        changes = []
        if path.runtime != self.runtime:
            changes.append(f'runtime.backend = "{path.runtime}"')
        if path.inference_precision != self.precision:
            changes.append(f'runtime.{path.runtime}.inference_precision = "{path.inference_precision}"')
        if self.artifact not in ("auto", path.artifact):
            changes.append('model.artifact = "auto"')
        if self.decode not in ("auto", path.decode):
            changes.append(f'imaging.decode = "{path.decode}" (or "auto")')
        return f"{' and '.join(changes)} ({path.key})"

    def __str__(self) -> str:
        return (f'runtime.backend = "{self.runtime}" ({self.precision}), model.artifact = "{self.artifact}", '
                f'imaging.decode = "{self.decode}"')


def choose_path(paths: list[ServedPath], wanted: Wanted, *, rank: Mapping[str, int], source: str) -> Choice:
    """The fastest path that met the bar among those `wanted` allows; ModelError naming the fix if none.

    `rank` orders artifacts where convert measured no time (manifests of format 1).
    """
    def speed(p: ServedPath) -> tuple[bool, float, int, int]:
        return (p.ms_per_image is None, p.ms_per_image or 0.0, rank.get(p.artifact, len(rank)),
                DECODE_MODES.index(p.decode))

    allowed = [p for p in paths if wanted.allows(p)]
    passing = [p for p in allowed if p.passed]
    if passing:
        best = min(passing, key=speed)
        f = best.figures
        measured = f"{best.ms_per_image:g} ms/img, " if best.ms_per_image is not None else ""
        verified = (f"top-1 {f['top1_agreement']:.1%} and max |dp| {f['max_abs_dp']:.3g} on {f['images']} "
                    f"verification photos" if "images" in f else "artifact parity passed in convert")
        return Choice(best, f"fastest of {len(passing)} path(s) that met the bar for these settings: {measured}{verified}")
    if allowed and wanted.artifact != "auto":
        # Named on purpose: served and flagged in every answer, as a degraded artifact always was.
        best = min(allowed, key=lambda p: (-p.figures.get("top1_agreement", 0.0), speed(p)))
        return Choice(best, f"model.artifact names {wanted.artifact}, whose path missed the bar ({best.summary()})", True)
    if allowed:
        what = f"no served path of {source} met the bar for {wanted} ({'; '.join(p.summary() for p in allowed[:3])})"
    else:
        what = f"{source} has no served path for {wanted}"
    others = sorted((p for p in paths if p.passed), key=speed)
    if others:
        raise ModelError(f"{what}; these passed: set {'; or '.join(wanted.changes_for(p) for p in others[:3])}")
    raise ModelError(f"{what}, and no other path passed either: reconvert with more (or more typical) photos in "
                     f"--calibration-dir, or relax the bar with --min-agreement / --max-dp")
