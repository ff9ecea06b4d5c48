"""Golden vectors: encoded test images with the probabilities PyTorch FP32 gives them.

The server decodes and preprocesses each one through its served path at every start
and must reproduce these answers. Images are procedural (no patient photo ever leaves
the clinic's calibration directory), in every format the server accepts (JPEG, PNG,
WebP), and JPEGs at sizes that the fast decode reads at each of its scales (1, 1/2,
1/4, 1/8; the large ones drawn small and upscaled with sensor-like noise, as a phone's
photo of a smaller scene), none with EXIF orientation. Only images whose top-1 leads
the runner-up by a comfortable margin are kept, so a tiny preprocessing difference
cannot flip the self-check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import preprocess_file
from .served import phone_size_copy
from .synthetic import synthetic_photos

GOLDEN_SEED = 7_000
MIN_MARGIN = 0.05
TRIES_PER_SLOT = 12
# (file suffix, PIL format, size drawn (w, h), shorter side of the file or None for as drawn).
# With the default 256 px resize the fast decode reads a JPEG at 1/s when its shorter side
# is >= 512 * s: 480 -> 1, 1050 -> 1/2, 2112 -> 1/4, 4128 -> 1/8.
SLOTS = [
    ("jpg", "JPEG", (640, 480), None),
    ("jpg", "JPEG", (480, 640), None),
    ("png", "PNG", (512, 512), None),
    ("webp", "WEBP", (800, 600), None),
    ("jpg", "JPEG", (700, 525), 1050),
    ("jpg", "JPEG", (704, 528), 2112),
    ("jpg", "JPEG", (688, 516), 4128),
]


@dataclass
class Golden:
    """Golden images on disk, their reference tensors and PyTorch FP32 probabilities."""

    files: list[Path]
    tensors: np.ndarray
    probabilities: np.ndarray
    low_margin: int  # images kept although their margin is below MIN_MARGIN


def margin(probs: np.ndarray) -> float:
    """Top-1 probability minus the runner-up's."""
    top = np.sort(probs)[::-1]
    return float(top[0] - top[1]) if len(top) > 1 else 1.0


def write_golden(directory: Path, reference: Callable[[np.ndarray], np.ndarray]) -> Golden:
    """Write the golden images to `directory` and compute their reference probabilities."""
    directory.mkdir(parents=True, exist_ok=True)
    files, tensors, probs, low = [], [], [], 0
    for index, (suffix, fmt, size, short_side) in enumerate(SLOTS):
        path = directory / f"{index}.{suffix}"
        best: tuple[float, bytes, np.ndarray, np.ndarray] | None = None
        for attempt in range(TRIES_PER_SLOT):
            seed = GOLDEN_SEED + 100 * index + attempt
            (image,) = synthetic_photos(1, seed, size)
            if short_side is not None:
                path.write_bytes(phone_size_copy(image, seed, short_side))
            else:
                image.save(path, fmt, **({"quality": 92} if fmt in ("JPEG", "WEBP") else {}))  # PIL writes no EXIF unless asked
            # Probabilities come from the encoded file, exactly what the server will read.
            tensor = preprocess_file(path)
            p = reference(tensor[None])[0]
            m = margin(p)
            if best is None or m > best[0]:
                best = (m, path.read_bytes(), tensor, p)
            if m >= MIN_MARGIN:
                break
        assert best is not None
        path.write_bytes(best[1])
        low += best[0] < MIN_MARGIN
        files.append(path)
        tensors.append(best[2])
        probs.append(best[3])
    return Golden(files, np.stack(tensors), np.stack(probs), low)
