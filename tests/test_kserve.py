"""KServe v2 REST through tritonclient's HTTP client (a real client) against a live server."""

from __future__ import annotations

import base64
import json
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from aiohttp import web
from tritonclient.utils import InferenceServerException

from appliance import __version__
from appliance.app import create_app
from appliance.config import parse_config
from appliance.keys import SCHEDULER, STATE
from appliance.security.auth import ApiKeys

from .conftest import BIAS, LABELS, WEIGHTS, encode, photo, reference_probabilities
from .liveserver import serve_in_thread

QUEUE_SIZE = 8
MAX_PIXELS = 1_000_000
API_KEY = "k-9f3b2c"
INPUT_SHAPE = [-1, 3, 224, 224]

# Never through a proxy: every request here goes to the test's own loopback server.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def expected(batch: np.ndarray) -> np.ndarray:
    """The tiny model's answer for a preprocessed batch (as tests/test_runtimes.py computes it)."""
    logits = batch.mean(axis=(2, 3)).astype(np.float64) @ WEIGHTS + BIAS
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def make_app(model_dir: Path, root: Path, api_keys: ApiKeys | None = None) -> web.Application:
    config = parse_config({
        "model": {"path": str(model_dir)},
        "storage": {"root": str(root)},
        "inference": {"max_wait_ms": 1.0, "queue_size": QUEUE_SIZE},
        "imaging": {"max_pixels": MAX_PIXELS},
    })
    return create_app(config, api_keys=ApiKeys() if api_keys is None else api_keys)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, web.Application]]:
    app = make_app(tiny_model_dir, tmp_path_factory.mktemp("data"))
    with serve_in_thread(app) as address:
        yield address, app


@pytest.fixture
def client(served: tuple[str, web.Application]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served[0]) as c:
        yield c


def fp32_input(batch: np.ndarray, *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def bytes_input(images: list[bytes], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", [len(images)], "BYTES")
    # JSON carries encoded images as base64 strings; the binary extension carries them raw.
    items = images if binary else [base64.b64encode(data) for data in images]
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)
    return tensor


def refused(call: Any) -> tuple[str, str]:
    """Status and message of the v2 error a tritonclient call raised."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def raw(address: str, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP exchange, for requests a real client would refuse to build."""
    request = urllib.request.Request(f"http://{address}{path}", data=body, headers=headers or {}, method=method)
    try:
        with _opener.open(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def infer_raw(address: str, request: Any, binary: bytes = b"",
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    head = request.encode() if isinstance(request, str) else json.dumps(request).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if binary:
        all_headers["Inference-Header-Content-Length"] = str(len(head))
    status, _, body = raw(address, "POST", "/v2/models/tiny/infer", head + binary, all_headers)
    return status, json.loads(body)


def images_stored(address: str) -> int:
    status, _, body = raw(address, "GET", "/v1/status")  # /ready names its checks only (issue 13)
    assert status == 200
    return json.loads(body)["storage"]["images"]


def test_server_live_ready_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata() == {
        "name": "derm-appliance", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


def test_model_metadata_and_readiness(client: triton.InferenceServerClient) -> None:
    metadata = {
        "name": "tiny", "versions": ["1"], "platform": "openvino",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": INPUT_SHAPE}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(LABELS)]}],
        "parameters": {"labels": list(LABELS), "demo": True},
    }
    assert client.get_model_metadata("tiny") == metadata
    assert client.get_model_metadata("tiny", "1") == metadata
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("melanoma-net")
    assert not client.is_model_ready("tiny", "2")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fp32_tensor_inference(client: triton.InferenceServerClient, served: tuple[str, web.Application],
                               binary: bool, rows: int) -> None:
    batch = np.random.default_rng(rows).normal(size=(rows, 3, 224, 224)).astype(np.float32)
    scheduler = served[1][SCHEDULER]
    images_before = scheduler.images
    result = client.infer(
        "tiny", [fp32_input(batch, binary=binary)], request_id=f"r{rows}",
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (rows, len(LABELS))
    np.testing.assert_allclose(probabilities, expected(batch), atol=1e-5)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("tiny", "1", f"r{rows}")
    output = response["outputs"][0]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [rows, len(LABELS)])
    if binary:
        assert output["parameters"] == {"binary_data_size": rows * len(LABELS) * 4} and "data" not in output
    else:
        assert "parameters" not in output and len(output["data"]) == rows * len(LABELS)
    # Every row went through the scheduler (one job each), which batched them.
    assert scheduler.images - images_before == rows


def test_outputs_default_to_binary_when_the_client_names_none(client: triton.InferenceServerClient) -> None:
    batch = np.zeros((2, 3, 224, 224), dtype=np.float32)
    result = client.infer("tiny", [fp32_input(batch, binary=True)], model_version="1")
    assert result.get_output("probabilities")["parameters"] == {"binary_data_size": 2 * len(LABELS) * 4}
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected(batch), atol=1e-5)


@pytest.mark.parametrize("binary", [False, True], ids=["json-base64", "binary"])
@pytest.mark.parametrize("formats", [["JPEG"], ["PNG"], ["JPEG", "PNG", "JPEG"]], ids=["jpeg", "png", "batch3"])
def test_encoded_images_are_decoded_by_the_appliance(client: triton.InferenceServerClient, served: tuple[str, web.Application],
                                                    binary: bool, formats: list[str]) -> None:
    colours = [(200, 140, 120), (90, 60, 160), (60, 160, 70)]
    images = [encode(photo(seed=k, colour=colours[k]), fmt) for k, fmt in enumerate(formats)]
    stored_before = images_stored(served[0])
    result = client.infer("tiny", [bytes_input(images, binary=binary)],
                          outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(images), len(LABELS))
    for row, data in zip(probabilities, images, strict=True):
        assert np.max(np.abs(row - reference_probabilities(data))) < 1e-3
    if len(images) == 3:  # differently coloured photos: the rows are really each image's own answer
        assert len({int(np.argmax(row)) for row in probabilities}) > 1
    # v2 answers are not stored: the clinic contract (/check-image) is the storing path.
    assert images_stored(served[0]) == stored_before


def test_unknown_model_or_version_is_404(client: triton.InferenceServerClient, served: tuple[str, web.Application]) -> None:
    tensor = fp32_input(np.zeros((1, 3, 224, 224), dtype=np.float32), binary=True)
    assert refused(lambda: client.infer("melanoma-net", [tensor])) == (
        "404", "Unknown model 'melanoma-net'; this appliance serves 'tiny'")
    assert refused(lambda: client.infer("tiny", [tensor], model_version="7")) == (
        "404", "Unknown version '7' of model 'tiny'; the served version is '1'")
    assert refused(lambda: client.get_model_metadata("melanoma-net")) == (
        "404", "Unknown model 'melanoma-net'; this appliance serves 'tiny'")
    status, _, body = raw(served[0], "GET", "/v2/models/tiny/versions/7/ready")
    assert (status, json.loads(body)) == (404, {"error": "Unknown version '7' of model 'tiny'; the served version is '1'"})
    status, _, body = raw(served[0], "GET", "/v2/models/tiny/stats")  # an extension not served (statistics)
    assert (status, json.loads(body)) == (404, {"error": "Not Found"})
    status, headers, body = raw(served[0], "GET", "/v2/models/tiny/infer")
    assert (status, json.loads(body)) == (405, {"error": "Method Not Allowed"})
    assert "POST" in headers["Allow"].split(",")


def test_wrong_shape_datatype_or_name_is_400(client: triton.InferenceServerClient) -> None:
    small = triton.InferInput("input", [1, 3, 200, 200], "FP32")
    small.set_data_from_numpy(np.zeros((1, 3, 200, 200), dtype=np.float32))
    assert refused(lambda: client.infer("tiny", [small])) == (
        "400", "Input 'input': FP32 shape must be [N, 3, 224, 224] with N >= 1; got [1, 3, 200, 200]")
    ints = triton.InferInput("input", [1, 3, 224, 224], "INT32")
    ints.set_data_from_numpy(np.zeros((1, 3, 224, 224), dtype=np.int32))
    assert refused(lambda: client.infer("tiny", [ints])) == (
        "400", "Input 'input': datatype must be FP32 (a preprocessed [N, 3, 224, 224] tensor) "
               "or BYTES (encoded images, shape [N]); got 'INT32'")
    images = triton.InferInput("input", [1, 1], "BYTES")
    images.set_data_from_numpy(np.array([[encode(photo())]], dtype=np.object_))
    assert refused(lambda: client.infer("tiny", [images])) == (
        "400", "Input 'input': BYTES shape must be [N] with N >= 1 (one encoded image each); got [1, 1]")
    renamed = triton.InferInput("pixels", [1, 3, 224, 224], "FP32")
    renamed.set_data_from_numpy(np.zeros((1, 3, 224, 224), dtype=np.float32))
    assert refused(lambda: client.infer("tiny", [renamed])) == (
        "400", "Unknown input 'pixels'; the model's input is 'input'")
    good = fp32_input(np.zeros((1, 3, 224, 224), dtype=np.float32), binary=True)
    assert refused(lambda: client.infer("tiny", [good], outputs=[triton.InferRequestedOutput("logits")])) == (
        "400", "Unknown output 'logits'; the model's output is 'probabilities'")
    assert refused(lambda: client.infer(
        "tiny", [good], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)])) == (
        "400", "Output 'probabilities': the classification extension is not supported")


@pytest.mark.parametrize("binary", [False, True], ids=["json-base64", "binary"])
def test_one_bad_image_in_a_batch_fails_the_request_naming_it(client: triton.InferenceServerClient,
                                                              served: tuple[str, web.Application], binary: bool) -> None:
    jpeg, png = encode(photo(seed=1)), encode(photo(seed=2), "PNG")
    gif = encode(photo(seed=3), "GIF")
    big = encode(photo(1200, 1000, seed=4), "PNG")
    stored_before = images_stored(served[0])

    def infer(images: list[bytes]) -> tuple[str, str]:
        return refused(lambda: client.infer("tiny", [bytes_input(images, binary=binary)]))

    assert infer([jpeg, b"definitely not an image", png]) == ("400", "Input 'input' element 1: Invalid image file")
    assert infer([jpeg, jpeg[: len(jpeg) // 3]]) == ("400", "Input 'input' element 1: Invalid image file")
    assert infer([gif, jpeg]) == (
        "415", "Input 'input' element 0: Unsupported image type: GIF. Accepted types: JPEG, PNG, WebP")
    assert infer([big]) == (
        "413", f"Input 'input' element 0: Image too large: 1200x1000 pixels exceeds the limit of {MAX_PIXELS}")
    assert images_stored(served[0]) == stored_before
    assert client.is_server_ready()


def test_malformed_requests_get_v2_errors(served: tuple[str, web.Application]) -> None:
    address = served[0]
    one = {"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224]}
    zeros = np.zeros(3 * 224 * 224, dtype="<f4").tobytes()
    status, _, body = raw(address, "POST", "/v2/models/tiny/infer", b"{not json", {"Content-Type": "application/json"})
    assert (status, json.loads(body)) == (400, {"error": "The inference request is not valid JSON"})
    assert infer_raw(address, [1, 2]) == (400, {"error": "The inference request must be a JSON object"})
    assert infer_raw(address, {"inputs": []}) == (
        400, {"error": "Field 'inputs' must list exactly one tensor, the model's input 'input'"})
    assert infer_raw(address, {"inputs": [one]}) == (
        400, {"error": "Input 'input' has neither 'data' nor parameter 'binary_data_size'"})
    assert infer_raw(address, {"inputs": [one | {"data": [0.5] * 10}]}) == (
        400, {"error": "Input 'input': 'data' holds 10 numbers; shape [1, 3, 224, 224] needs 150528"})
    assert infer_raw(address, {"inputs": [one | {"data": ["0.5"] * 150528}]}) == (
        400, {"error": "Input 'input': 'data' must be a list of numbers (flat or nested as the shape)"})
    for beyond in ("1e400", "-3.5e38", "NaN"):  # beyond float64, beyond FP32, not JSON
        overflowing = json.dumps({"inputs": [one | {"data": [0.5] * 150527 + ["X"]}]}).replace('"X"', beyond)
        assert infer_raw(address, overflowing) == (400, {"error": "Input 'input': values must be finite FP32 numbers"
                                                         if beyond != "NaN" else "The inference request is not valid JSON"})
    nan = np.zeros(3 * 224 * 224, dtype="<f4")
    nan[7] = np.nan
    assert infer_raw(address, {"inputs": [one | {"parameters": {"binary_data_size": nan.nbytes}}]}, nan.tobytes()) == (
        400, {"error": "Input 'input': values must be finite FP32 numbers"})
    sized = one | {"parameters": {"binary_data_size": len(zeros)}}
    assert infer_raw(address, {"inputs": [sized]}, zeros + b"\0\0\0\0") == (
        400, {"error": "4 bytes of binary data follow the inputs' binary_data_size"})
    assert infer_raw(address, {"inputs": [sized]}, zeros[:-4]) == (
        400, {"error": f"Input 'input': binary_data_size {len(zeros)} exceeds the {len(zeros) - 4} bytes after the JSON header"})
    status, _, body = raw(address, "POST", "/v2/models/tiny/infer", b"{}", {"Inference-Header-Content-Length": "x1"})
    assert (status, json.loads(body)) == (400, {"error": "Header Inference-Header-Content-Length must be a whole number of bytes"})
    status, _, body = raw(address, "POST", "/v2/models/tiny/infer", b"{}", {"Inference-Header-Content-Length": "9"})
    assert (status, json.loads(body)) == (400, {"error": "Header Inference-Header-Content-Length is 9 but the body holds 2 bytes"})
    images = {"name": "input", "datatype": "BYTES", "shape": [2]}
    assert infer_raw(address, {"inputs": [images | {"data": ["aGVsbG8=", "%%%"]}]}) == (
        400, {"error": "Input 'input' element 1: not base64 (BYTES in JSON carry base64-encoded images)"})
    packed = struct.pack("<I", 100) + b"short"
    assert infer_raw(address, {"inputs": [images | {"parameters": {"binary_data_size": len(packed)}}]}, packed) == (
        400, {"error": "Input 'input': malformed BYTES binary data (each element is a 4-byte little-endian length and its bytes)"})
    too_many = {"name": "input", "datatype": "BYTES", "shape": [QUEUE_SIZE + 1], "data": ["aGVsbG8="] * (QUEUE_SIZE + 1)}
    assert infer_raw(address, {"inputs": [too_many]}) == (
        413, {"error": f"Input 'input': a batch of {QUEUE_SIZE + 1} exceeds the limit of {QUEUE_SIZE} (inference.queue_size)"})
    assert infer_raw(address, {"inputs": [one | {"data": [0] * 150528}], "id": 5}) == (
        400, {"error": "Field 'id' must be a string"})


def test_not_ready_is_503_with_retry_after(client: triton.InferenceServerClient, served: tuple[str, web.Application]) -> None:
    state = served[1][STATE]
    state.ready = False
    try:
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready("tiny")
        tensor = fp32_input(np.zeros((1, 3, 224, 224), dtype=np.float32), binary=True)
        assert refused(lambda: client.infer("tiny", [tensor])) == ("503", "The model is not ready")
        status, headers, body = raw(served[0], "GET", "/v2/health/ready")
        assert (status, headers["Retry-After"], json.loads(body)) == (503, "1", {"error": "The model is not ready"})
    finally:
        state.ready = True


def test_api_key_guards_v2_except_health(tiny_model_dir: Path, tmp_path: Path) -> None:
    app = make_app(tiny_model_dir, tmp_path / "data", ApiKeys.of({"lab-script": API_KEY}))
    with serve_in_thread(app) as address, triton.InferenceServerClient(address) as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        tensor = fp32_input(np.zeros((1, 3, 224, 224), dtype=np.float32), binary=True)
        assert refused(lambda: client.infer("tiny", [tensor])) == ("401", "Invalid API key")
        assert refused(lambda: client.infer("tiny", [tensor], headers={"X-API-Key": "wrong"})) == ("401", "Invalid API key")
        assert refused(lambda: client.get_model_metadata("tiny")) == ("401", "Invalid API key")
        assert refused(lambda: client.get_server_metadata()) == ("401", "Invalid API key")
        # The key is all v2 needs: no X-User-Id, unlike the clinic contract.
        result = client.infer("tiny", [tensor], headers={"X-API-Key": API_KEY})
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected(np.zeros((1, 3, 224, 224))), atol=1e-5)


def test_gzip_compressed_request(client: triton.InferenceServerClient) -> None:
    batch = np.random.default_rng(9).normal(size=(2, 3, 224, 224)).astype(np.float32)
    result = client.infer("tiny", [fp32_input(batch, binary=True)], request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected(batch), atol=1e-5)
