"""A v2 inference request, as kserve parsed it, checked into a preprocessed batch or encoded images.

The faults and their wording are the appliance's own /v2 endpoint's
(appliance/api/kserve.py), so a client gets the same answer from either.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve import InferRequest

from appliance.api.kserve import check_rows
from appliance.errors import BadRequest
from appliance.modeldir import Manifest


@dataclass(frozen=True)
class Batch:
    """One request's rows: a preprocessed FP32 tensor [N, 3, crop, crop] or N encoded images."""

    tensor: np.ndarray | None
    images: list[bytes] | None


def read_batch(request: InferRequest, manifest: Manifest, *, max_rows: int) -> Batch:
    """The request's one input as a batch; BadRequest (400) or PayloadTooLarge (413) names the fault."""
    if len(request.inputs) != 1:
        raise BadRequest(f"Field 'inputs' must list exactly one tensor, the model's input '{manifest.input_name}'")
    tensor = request.inputs[0]
    if tensor.name != manifest.input_name:
        raise BadRequest(f"Unknown input '{tensor.name}'; the model's input is '{manifest.input_name}'")
    label = f"Input '{tensor.name}'"
    shape = list(tensor.shape)
    check_rows(label, tensor.datatype, shape, manifest.preprocessing.crop, max_rows)
    try:
        array = tensor.as_numpy()
    except ValueError:  # JSON data of the wrong length, or not numbers
        raise BadRequest(f"{label}: 'data' must hold {int(np.prod(shape))} numbers for shape {shape}") from None
    if tensor.datatype == "BYTES":
        return Batch(None, [_image(item, index, label) for index, item in enumerate(array.ravel())])
    if not np.isfinite(array).all():
        raise BadRequest(f"{label}: values must be finite FP32 numbers")
    return Batch(array.astype(np.float32, copy=False), None)


def _image(item: Any, index: int, label: str) -> bytes:
    """One BYTES element: raw bytes (binary tensor data) or base64 text (JSON), as the appliance takes them."""
    if isinstance(item, bytes):
        return item
    try:
        return base64.b64decode(str(item), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{label} element {index}: not base64 (BYTES in JSON carry base64-encoded images)") from None
