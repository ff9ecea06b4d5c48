"""The reference preprocessing (what training used) and loading a directory of photos."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import ConvertError

RESIZE_SHORTER = 256
CROP = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


def preprocessing_table() -> dict:
    """The manifest's `preprocessing` table for the reference preprocessing."""
    return {
        "color": "RGB",
        "resize_shorter": RESIZE_SHORTER,
        "interpolation": "bilinear-antialias",
        "crop": CROP,
        "scale": 1 / 255,
        "mean": list(MEAN),
        "std": list(STD),
    }


def _transform():
    # torchvision is imported lazily: it is the slow part of `import convert`.
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(RESIZE_SHORTER),
            transforms.CenterCrop(CROP),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def preprocess(images: Iterable[Image.Image]) -> np.ndarray:
    """Reference preprocessing of decoded images: float32 [N, 3, 224, 224], normalised."""
    transform = _transform()
    arrays = [transform(image.convert("RGB")).numpy() for image in images]
    if not arrays:
        return np.zeros((0, 3, CROP, CROP), np.float32)
    return np.stack(arrays).astype(np.float32, copy=False)


def preprocess_file(path: Path) -> np.ndarray:
    """Reference preprocessing of one encoded file, exactly as the manifest states it."""
    with Image.open(path) as image:
        return preprocess([image.convert("RGB")])[0]


@dataclass(frozen=True)
class ImageSet:
    """Photos from a directory, already through the reference preprocessing."""

    names: list[str]
    tensors: np.ndarray  # float32 [N, 3, 224, 224]
    skipped: int  # files that could not be decoded


def load_image_dir(directory: Path, *, limit: int | None = None) -> ImageSet:
    """Decode and preprocess every image below `directory`; unreadable files are skipped and counted."""
    if not directory.exists():
        raise ConvertError(f"calibration directory not found: {directory}")
    if not directory.is_dir():
        raise ConvertError(f"calibration path is not a directory: {directory}")
    try:
        # rglob silently skips directories it cannot list; listing the top first reports that.
        os.listdir(directory)
        files = sorted(
            p for p in directory.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        )
    except OSError as exc:
        raise ConvertError(f"cannot read calibration directory {directory}: {exc.strerror or exc}") from None
    if not files:
        raise ConvertError(f"calibration directory is empty: {directory}")
    transform = _transform()
    names: list[str] = []
    arrays: list[np.ndarray] = []
    skipped = 0
    for path in tqdm(files, desc="reading calibration images", unit="img", leave=False):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            skipped += 1
            continue
        names.append(str(path.relative_to(directory)))
        arrays.append(transform(rgb).numpy())
    if not arrays:
        raise ConvertError(f"no readable images in calibration directory {directory} ({skipped} unreadable files skipped)")
    return ImageSet(names, np.stack(arrays).astype(np.float32, copy=False), skipped)
