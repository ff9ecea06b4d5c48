"""KServe v2 (Open Inference Protocol) REST on the served model: health, metadata, inference.

The model's one input takes either a preprocessed FP32 tensor [N, 3, 224, 224]
or, like OpenVINO Model Server, a BYTES tensor [N] of encoded images that the
appliance decodes with its own pipeline (JSON carries them base64-encoded; the
binary tensor data extension carries them raw). Every row goes through
`services.Classifier`, the classify use case of `POST /check-image` too, so
decoding, batching, the queue limit (503) and the single inference thread hold
as for the clinic API. Results are not stored: the clinic contract
(`POST /check-image`) is the path that keeps images and decisions.

Mounted as a sub-app under /v2 whose errors are `{"error": ...}` (the
protocol's shape; the one error middleware reads ERROR_FIELD).

The model repository extension (`POST /v2/repository/index`,
`.../models/{name}/load` and `/unload`) changes what is served, so only an
admin key may call it (with no keys configured: loopback callers only). `load`
is the reload every other trigger runs; `unload` of the one served model
answers 409: an appliance with no model would only answer 503.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from .. import __version__
from ..errors import BadRequest, Forbidden, NotFound, Overloaded, PayloadTooLarge, UnprocessableEntity
from ..inference.lifecycle import ModelConflict
from ..inference.model import LoadedModel, Manifest, model_versions
from ..keys import API_KEYS, CLINIC, CONFIG, ERROR_FIELD, EXECUTORS, KEY_NAME, MODELS, STATE
from ..security.auth import Role, is_loopback
from . import loads_strict
from .clinic import within_body_timeout
from .ops import name_answer
from .policy import Policy, route_policy

routes = web.RouteTableDef()  # paths under PREFIX

PREFIX = "/v2"
SERVER_NAME = "derm-appliance"
EXTENSIONS = ("binary_tensor_data", "model_repository")  # model_repository: index, load and unload of this one model (admin)
HEADER_LENGTH = "Inference-Header-Content-Length"
# Triton's platform names, so fleet tooling reads ours the same way.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}


@dataclass(frozen=True)
class InferRequest:
    """A parsed, validated inference request: a preprocessed batch or encoded images."""

    id: str | None
    tensor: np.ndarray | None  # FP32 [N, 3, crop, crop]
    images: list[bytes] | None  # encoded images, one per row
    binary_output: bool


def create_kserve_app() -> web.Application:
    """The v2 protocol as a sub-app (mount it at PREFIX); the app's keys are read through `config_dict`."""
    app = web.Application()
    app[ERROR_FIELD] = "error"
    app.add_routes(routes)
    return app


@routes.get("/health/live")
@route_policy(Policy.PUBLIC)
async def server_live(request: web.Request) -> web.Response:
    """200 while the process serves requests."""
    return web.json_response({"live": True})


@routes.get("/health/ready")
@route_policy(Policy.PUBLIC)
async def server_ready(request: web.Request) -> web.Response:
    """200 once the model is loaded and self-checked; 503 otherwise."""
    _require_ready(request)
    return web.json_response({"ready": True})


@routes.get("")
async def server_metadata(request: web.Request) -> web.Response:
    """The server's name, version and protocol extensions."""
    return web.json_response({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})


@routes.get("/models/{name}")
@routes.get("/models/{name}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    """The model's tensors; `parameters.labels` names the output's columns."""
    model = _served(request)
    manifest = model.manifest
    runtime = model.runtime.describe()["runtime"]
    return web.json_response(
        {
            "name": manifest.name,
            "versions": [manifest.version],
            "platform": PLATFORMS.get(runtime, runtime),
            "inputs": [{"name": manifest.input_name, "datatype": "FP32", "shape": _input_shape(manifest)}],
            "outputs": [{"name": manifest.output_name, "datatype": "FP32", "shape": [-1, len(manifest.labels)]}],
            "parameters": {"labels": list(manifest.labels), "demo": manifest.demo},
        }
    )


@routes.get("/models/{name}/ready")
@routes.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    """200 when the model answers inference requests; 503 otherwise."""
    model = _served(request)
    _require_ready(request)
    return web.json_response({"name": model.manifest.name, "ready": True})


@routes.post("/models/{name}/infer")
@routes.post("/models/{name}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    """Classify a batch; answer `probabilities` FP32 [N, classes] in label order."""
    shared = request.config_dict
    _served(request)
    _require_ready(request)
    body = await _read_body(request)
    # The version serving now answers the whole request, even if a swap comes while it is parsed.
    classifier = shared[CLINIC].classifier
    model = _served(request, classifier.model)
    with classifier.scheduler.keep(model.runtime):
        # Parsing a JSON tensor of tens of MB is CPU work: keep it off the event loop.
        parsed = await asyncio.get_running_loop().run_in_executor(
            shared[EXECUTORS].decode,
            lambda: parse_infer_request(
                body, request.headers.get(HEADER_LENGTH), model.manifest, max_rows=shared[CONFIG].inference.queue_size
            ),
        )
        if parsed.images is not None:
            probabilities = await classifier.classify_images(parsed.images)
        else:
            assert parsed.tensor is not None
            probabilities = await classifier.classify_tensors(parsed.tensor)
    return name_answer(request, render_response(model.manifest, parsed, probabilities), classifier.model_info)


@routes.post("/repository/index")
async def repository_index(request: web.Request) -> web.Response:
    """The versions in the served model's directory: the one serving READY, the others UNAVAILABLE."""
    _require_admin(request)
    lifecycle = request.config_dict[MODELS]
    current = lifecycle.current.manifest
    served = lifecycle.version_dir
    others = await asyncio.to_thread(model_versions, served.parent)  # listing a directory is I/O
    index = [{"name": current.name, "version": current.version, "state": "READY", "reason": ""}]
    index += [{"name": current.name, "version": path.name, "state": "UNAVAILABLE", "reason": "not loaded"}
              for path in others if path.resolve() != served.resolve()]
    return web.json_response(index)


@routes.post("/repository/models/{name}/load")
async def repository_load(request: web.Request) -> web.Response:
    """Reload: serve the version model.path and model.pin_version name now, once it passed its checks; 422 if refused."""
    _require_admin(request)
    _served(request)
    outcome = await request.config_dict[MODELS].reload("repository API")
    if outcome.result == "refused":
        raise UnprocessableEntity(f"Version {outcome.version or '?'} refused: {outcome.reason}")
    return web.json_response({})


@routes.post("/repository/models/{name}/unload")
async def repository_unload(request: web.Request) -> web.Response:
    """409: the appliance serves one model, and a box without one would answer nothing but 503."""
    _require_admin(request)
    model = _served(request)
    raise ModelConflict(f"Model '{model.manifest.name}' is the only model served and cannot be unloaded; to serve "
                        "another version, set model.pin_version and load it (POST .../load)")


def _require_admin(request: web.Request) -> None:
    """Changing the served model takes an admin key; with no keys configured, a caller on this machine."""
    keys = request.config_dict[API_KEYS]
    if keys:
        if keys.role_of(request.get(KEY_NAME)) is not Role.ADMIN:
            raise Forbidden("Only an admin key may change the served model (the repository API)")
    # A proxy on this machine, or a web page's script posting to 127.0.0.1, also arrives from loopback:
    # their headers say the caller is elsewhere.
    elif not is_loopback(request.remote or "") or any(
            name in request.headers for name in ("Origin", "Forwarded", "X-Forwarded-For")):
        raise Forbidden("With no API keys configured the repository API answers only on this machine; "
                        "configure an admin key (auth.keys_file, name:key:admin)")


def _served(request: web.Request, model: LoadedModel | None = None) -> LoadedModel:
    """The model the path names (the one serving now, or `model`), or 404 for another name or version."""
    model = model or request.config_dict[MODELS].current
    manifest = model.manifest
    name = request.match_info["name"]
    version = request.match_info.get("version")
    if name != manifest.name:
        raise NotFound(f"Unknown model '{name}'; this appliance serves '{manifest.name}'")
    if version is not None and version != manifest.version:
        raise NotFound(f"Unknown version '{version}' of model '{name}'; the served version is '{manifest.version}'")
    return model


def _require_ready(request: web.Request) -> None:
    if not request.config_dict[STATE].ready:
        raise Overloaded("The model is not ready")


def _input_shape(manifest: Manifest) -> list[int]:
    crop = manifest.preprocessing.crop
    return [-1, 3, crop, crop]


async def _read_body(request: web.Request) -> bytes:
    """The whole body: 413 for one declared over the cap before reading it, 408 for a slow client."""
    limit = request.config_dict[CONFIG].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body too large (limit {limit} bytes)")
    # aiohttp's client_max_size stops an undeclared one (413).
    return await within_body_timeout(request, request.read())


def parse_infer_request(body: bytes, header_length: str | None, manifest: Manifest, *, max_rows: int) -> InferRequest:
    """Validate an inference request (JSON, or JSON + binary tensor data); BadRequest names the fault."""
    head, binary = _split_body(body, header_length)
    try:
        request = loads_strict(head, finite=False)  # tensor values get their own finite check
    except (ValueError, RecursionError):
        raise BadRequest("The inference request is not valid JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("The inference request must be a JSON object")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("Field 'id' must be a string")
    parameters = _parameters(request, "The request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("Parameter 'binary_data_output' must be true or false")
    binary_output = _binary_output(request, manifest, binary_output)

    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(f"Field 'inputs' must list exactly one tensor, the model's input '{manifest.input_name}'")
    tensor = inputs[0]
    name = tensor.get("name")
    if name != manifest.input_name:
        raise BadRequest(f"Unknown input {_quote(name)}; the model's input is '{manifest.input_name}'")
    label = f"Input '{name}'"
    datatype = tensor.get("datatype")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"{label}: shape must be a list of non-negative whole numbers")
    rows = check_rows(label, datatype, shape, manifest.preprocessing.crop, max_rows)

    size = _parameters(tensor, label).get("binary_data_size")
    has_data = "data" in tensor
    if size is not None and has_data:
        raise BadRequest(f"{label} has both 'data' and parameter 'binary_data_size'")
    if size is None and not has_data:
        raise BadRequest(f"{label} has neither 'data' nor parameter 'binary_data_size'")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"{label}: parameter 'binary_data_size' must be a non-negative whole number")
        if size > len(binary):
            raise BadRequest(f"{label}: binary_data_size {size} exceeds the {len(binary)} bytes after the JSON header")
        if size < len(binary):
            raise BadRequest(f"{len(binary) - size} bytes of binary data follow the inputs' binary_data_size")
    elif binary:
        raise BadRequest(f"{len(binary)} bytes of binary data follow the inputs' binary_data_size")

    if datatype == "BYTES":
        images = _bytes_from_binary(binary, rows, label) if size is not None else _bytes_from_json(tensor["data"], rows, label)
        return InferRequest(request_id, None, images, binary_output)
    count = int(np.prod(shape))
    if size is not None:
        if size != 4 * count:
            raise BadRequest(f"{label}: binary_data_size is {size}; FP32 {shape} takes {4 * count} bytes")
        array = np.frombuffer(binary, dtype="<f4").reshape(shape)
    else:
        array = _floats_from_json(tensor["data"], shape, count, label)
    if not np.isfinite(array).all():
        raise BadRequest(f"{label}: values must be finite FP32 numbers")
    return InferRequest(request_id, array.astype(np.float32, copy=False), None, binary_output)


def render_response(manifest: Manifest, request: InferRequest, probabilities: np.ndarray) -> web.Response:
    """The v2 response: JSON data, or the binary tensor data extension's JSON header + raw FP32."""
    output: dict[str, Any] = {"name": manifest.output_name, "datatype": "FP32", "shape": list(probabilities.shape)}
    raw = b""
    if request.binary_output:
        raw = probabilities.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = probabilities.ravel().tolist()
    body: dict[str, Any] = {"model_name": manifest.name, "model_version": manifest.version, "outputs": [output]}
    if request.id is not None:
        body["id"] = request.id
    if not request.binary_output:
        return web.json_response(body)
    head = json.dumps(body).encode()
    return web.Response(
        body=head + raw, content_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))}
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    value = header_length.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise BadRequest(f"Header {HEADER_LENGTH} must be a whole number of bytes")
    length = int(value)
    if length > len(body):
        raise BadRequest(f"Header {HEADER_LENGTH} is {length} but the body holds {len(body)} bytes")
    return body[:length], body[length:]


def check_rows(label: str, datatype: Any, shape: list[int], crop: int, max_rows: int) -> int:
    """The batch's row count for an FP32 [N, 3, crop, crop] or BYTES [N] input; BadRequest / PayloadTooLarge if not.

    Shared with the KServe SDK predictor (predictor/inputs.py), so both answer a fault in the same words.
    """
    if datatype == "FP32":
        if len(shape) != 4 or shape[1:] != [3, crop, crop] or shape[0] < 1:
            raise BadRequest(f"{label}: FP32 shape must be [N, 3, {crop}, {crop}] with N >= 1; got {shape}")
    elif datatype == "BYTES":
        if len(shape) != 1 or shape[0] < 1:
            raise BadRequest(f"{label}: BYTES shape must be [N] with N >= 1 (one encoded image each); got {shape}")
    else:
        raise BadRequest(
            f"{label}: datatype must be FP32 (a preprocessed [N, 3, {crop}, {crop}] tensor) "
            f"or BYTES (encoded images, shape [N]); got {_quote(datatype)}"
        )
    if shape[0] > max_rows:
        raise PayloadTooLarge(f"{label}: a batch of {shape[0]} exceeds the limit of {max_rows} (inference.queue_size)")
    return shape[0]


def _quote(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)[:60]


def _parameters(obj: dict[str, Any], label: str) -> dict[str, Any]:
    parameters = obj.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"{label}: 'parameters' must be an object")
    return parameters


def _binary_output(request: dict[str, Any], manifest: Manifest, default: bool) -> bool:
    """Whether the one output goes as binary data: its own `binary_data`, else the request's default."""
    outputs = request.get("outputs")
    if outputs is None:
        return default
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadRequest("Field 'outputs' must be a list of objects")
    binary = default
    for output in outputs:
        name = output.get("name")
        if name != manifest.output_name:
            raise BadRequest(f"Unknown output {_quote(name)}; the model's output is '{manifest.output_name}'")
        parameters = _parameters(output, f"Output '{name}'")
        if "classification" in parameters:
            raise BadRequest(f"Output '{name}': the classification extension is not supported")
        binary = parameters.get("binary_data", default)
        if not isinstance(binary, bool):
            raise BadRequest(f"Output '{name}': parameter 'binary_data' must be true or false")
    return binary


def _floats_from_json(data: Any, shape: list[int], count: int, label: str) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{label}: 'data' must be a list of numbers")
    try:
        array = np.asarray(data)
    except ValueError:  # ragged nesting
        raise BadRequest(f"{label}: 'data' must be a list of numbers (flat or nested as the shape)") from None
    if array.dtype.kind not in "iuf" or array.size != count:
        if array.dtype.kind in "iuf":
            raise BadRequest(f"{label}: 'data' holds {array.size} numbers; shape {shape} needs {count}")
        raise BadRequest(f"{label}: 'data' must be a list of numbers (flat or nested as the shape)")
    with np.errstate(over="ignore"):  # a number beyond FP32 becomes inf, which the caller refuses
        return array.astype(np.float32).reshape(shape)


def _bytes_from_json(data: Any, rows: int, label: str) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise BadRequest(f"{label}: BYTES 'data' must be a list of base64-encoded images")
    if len(data) != rows:
        raise BadRequest(f"{label}: 'data' holds {len(data)} elements; shape [{rows}] needs {rows}")
    images = []
    for index, item in enumerate(data):
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"{label} element {index}: not base64 (BYTES in JSON carry base64-encoded images)") from None
    return images


def _bytes_from_binary(binary: bytes, rows: int, label: str) -> list[bytes]:
    """Split the extension's BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    images, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise BadRequest(f"{label}: malformed BYTES binary data (each element is a 4-byte little-endian length and its bytes)")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise BadRequest(f"{label}: malformed BYTES binary data (each element is a 4-byte little-endian length and its bytes)")
        images.append(binary[offset : offset + length])
        offset += length
    if len(images) != rows:
        raise BadRequest(f"{label}: binary data holds {len(images)} elements; shape [{rows}] needs {rows}")
    return images
