"""The benchmark's inputs: a 12 MP phone photo, a 600x450 dermoscopy image, request bodies.

Both images are synthetic and deterministic. The phone photo is the scene of
bench/blur_scale.py (1/f texture, a lesion-like blob, hairs, mild sensor
noise) at 4032x3024, JPEG quality 90: about 3.3 MB, like a real phone's.
The dermoscopy image is one of convert's procedural lesions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BOUNDARY = "----benchboundary7MA4YWxkTrZu0gW"
USER_ID = "bench01"


@dataclass(frozen=True)
class Workload:
    """One image the load generator sends, and its request body."""

    key: str  # "phone" or "derm"
    title: str
    path: Path  # the JPEG
    body_path: Path  # the multipart/form-data body for POST /check-image
    size: tuple[int, int]
    bytes: int


def make_images(directory: Path) -> dict[str, Workload]:
    """Write both JPEGs and their multipart bodies under `directory`."""
    from PIL import Image

    from bench.blur_scale import make_scene, photo
    from convert.synthetic import synthetic_photos

    directory.mkdir(parents=True, exist_ok=True)
    phone = photo(make_scene(4032, 3024, seed=7), (4032, 3024), 0.0, 2.0, np.random.default_rng(7))
    buffer = io.BytesIO()
    synthetic_photos(1, 20240611, (600, 450))[0].save(buffer, "JPEG", quality=90)
    derm = buffer.getvalue()
    workloads = {}
    # The small image first: the peak RSS after its cells is then its own.
    for key, title, data in (("derm", "600×450 dermoscopy", derm), ("phone", "12 MP phone photo", phone)):
        path = directory / f"{key}.jpg"
        path.write_bytes(data)
        body_path = directory / f"{key}.multipart"
        body_path.write_bytes(multipart_body(data, f"{key}.jpg"))
        with Image.open(path) as im:
            size = im.size
        workloads[key] = Workload(key, title, path, body_path, size, len(data))
    return workloads


def multipart_body(data: bytes, filename: str) -> bytes:
    """A multipart/form-data body with one part named `file`, as the phone app sends it."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def v2_body(tensor: np.ndarray, input_name: str = "input") -> tuple[bytes, int]:
    """A KServe v2 infer body (binary tensor data extension) for one FP32 [3, H, W] tensor, and its JSON length."""
    batch = np.ascontiguousarray(tensor[None], dtype="<f4")
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": list(batch.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": batch.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()
    return header + batch.tobytes(), len(header)
