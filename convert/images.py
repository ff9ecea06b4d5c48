"""The reference preprocessing (what training used) and loading a directory of photos."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Iterable, Iterator
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from appliance.modeldir import CROP, MEAN, RESIZE_SHORTER, STD

from .errors import ConvertError

T = TypeVar("T")
R = TypeVar("R")


def map_threads(function: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """`function` of each item, in order, on a thread per core: PIL's decode, resize and encode, NumPy's
    random draws and torch's tensor maths release the GIL, so photos are worked on side by side.

    Lazy: at most two items per thread are worked on ahead of the one yielded, so a caller that stops
    early has not paid for the rest, and memory stays bounded (at most 8 threads: a 12 MP photo
    in the works takes about 100 MB).
    """
    workers = min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@functools.lru_cache(maxsize=2)
def _transform(crop: int = CROP) -> Callable[[Image.Image], Any]:
    """The reference transform; a smaller `crop` scales the resize with it (the demo trains at half size)."""
    # torchvision is imported lazily: it is the slow part of `import convert`.
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(RESIZE_SHORTER * crop // CROP),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def preprocess(images: Iterable[Image.Image], crop: int = CROP) -> np.ndarray:
    """Reference preprocessing of decoded images: float32 [N, 3, crop, crop], normalised."""
    transform = _transform(crop)
    arrays = [transform(image.convert("RGB")).numpy() for image in images]
    if not arrays:
        return np.zeros((0, 3, crop, crop), np.float32)
    return np.stack(arrays).astype(np.float32, copy=False)


def jpeg_bytes(image: Image.Image, quality: int = 92) -> bytes:
    """`image` encoded as a JPEG, as a phone's camera app would send it (no EXIF)."""
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def reference_crop(source: Path | IO[bytes]) -> Image.Image:
    """The 8-bit crop the reference preprocessing normalises (Resize and CenterCrop of the oriented photo)."""
    from torchvision import transforms

    with Image.open(source) as image:
        oriented = ImageOps.exif_transpose(image).convert("RGB")
    return transforms.Compose([transforms.Resize(RESIZE_SHORTER), transforms.CenterCrop(CROP)])(oriented)


def reference_tensor(source: Path | IO[bytes]) -> np.ndarray:
    """Reference preprocessing of one encoded photo, EXIF orientation applied as the server applies it."""
    with Image.open(source) as image:
        return _transform()(ImageOps.exif_transpose(image).convert("RGB")).numpy()


def preprocess_file(path: Path) -> np.ndarray:
    """Reference preprocessing of one encoded file, exactly as the manifest states it."""
    return reference_tensor(path)


# What the server accepts (appliance.contract.ACCEPTED_FORMATS), as PIL names them; MPO is a phone's multi-picture JPEG.
SERVABLE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}


@dataclass(frozen=True)
class ImageSet:
    """Photos from a directory, already through the reference preprocessing."""

    names: list[str]
    tensors: np.ndarray  # float32 [N, 3, 224, 224]
    skipped: int  # files that could not be decoded
    sources: list[Path | bytes]  # each photo's file (or encoded bytes), for the served-path measurement
    servable: list[bool]  # whether the server accepts its format (only those can verify a served path)

    def data(self, index: int) -> bytes:
        """The encoded bytes of photo `index`."""
        source = self.sources[index]
        return source if isinstance(source, bytes) else source.read_bytes()


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
    names: list[str] = []
    arrays: list[np.ndarray] = []
    sources: list[Path | bytes] = []
    servable: list[bool] = []
    skipped = 0

    def read(path: Path) -> tuple[str | None, np.ndarray] | None:
        try:
            with Image.open(path) as image:
                fmt = image.format
            return fmt, reference_tensor(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    results = zip(files, map_threads(read, files), strict=True)
    for path, result in tqdm(results, total=len(files), desc="reading calibration images", unit="img", leave=False):
        if limit is not None and len(arrays) >= limit:
            break
        if result is None:
            skipped += 1
            continue
        fmt, tensor = result
        arrays.append(tensor)
        names.append(str(path.relative_to(directory)))
        sources.append(path)
        servable.append(fmt in SERVABLE_FORMATS)
    if not arrays:
        raise ConvertError(f"no readable images in calibration directory {directory} ({skipped} unreadable files skipped)")
    return ImageSet(names, np.stack(arrays).astype(np.float32, copy=False), skipped, sources, servable)


def image_set(photos: list[bytes], prefix: str) -> ImageSet:
    """An ImageSet of encoded photos made in memory (the demo's, tests')."""
    tensors = np.stack([reference_tensor(io.BytesIO(data)) for data in photos])
    return ImageSet([f"{prefix}-{i}" for i in range(len(photos))], tensors, 0, list(photos), [True] * len(photos))
