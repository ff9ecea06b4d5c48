"""The phone app's contract, through a real aiohttp server, over every store back end."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.keys import STORE
from appliance.security.auth import ApiKeys
from appliance.storage import BACKENDS

from .conftest import LABELS, encode, photo, reference_probabilities

USER = {"X-User-Id": "user001", "X-User-Role": "gp"}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def client(aiohttp_client: Any, make_config: Any, backend: str) -> TestClient:
    return await aiohttp_client(create_app(make_config(storage__backend=backend)))


def upload(data: bytes, name: str = "file", filename: str = "photo.jpg", content_type: str = "image/jpeg") -> aiohttp.FormData:
    form = aiohttp.FormData()
    # A file object, not bytes: aiohttp warns about large raw byte bodies.
    form.add_field(name, io.BytesIO(data), filename=filename, content_type=content_type)
    return form


async def check(client: TestClient, data: bytes, *, headers: dict[str, str] = USER, query: str = "") -> tuple[int, Any]:
    response = await client.post(f"/check-image{query}", data=upload(data), headers=headers)
    return response.status, await response.json()


async def test_health_needs_no_headers(client: TestClient) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_check_image_answers_the_contract(client: TestClient) -> None:
    data = encode(photo(seed=3, colour=(90, 60, 160)))
    status, body = await check(client, data)
    assert status == 200
    assert body["status"] == "success"
    assert body["message"] == "Image processed"
    assert body["blur_score"] >= 100.0
    assert body["case_id"] == "10000"
    assert body["user_id"] == "user001" and body["user_role"] == "gp"
    assert isinstance(body["image_id"], str) and len(body["image_id"]) == 36
    labels = [p["label"] for p in body["predictions"]]
    confidences = [p["confidence"] for p in body["predictions"]]
    assert sorted(labels) == sorted(LABELS)
    assert confidences == sorted(confidences, reverse=True)
    expected = reference_probabilities(data)
    got = np.array([confidences[labels.index(label)] for label in LABELS])
    assert np.max(np.abs(got - expected)) < 1e-3
    assert body["low_confidence"] == (confidences[0] < 0.5)
    assert body["model"] == {"name": "tiny", "version": "1", "artifact": "openvino-fp32", "precision": "fp32",
                             "runtime": "openvino", "device": "CPU", "decode": "fast",
                             "served_path": "openvino-fp32/fast", "demo": True}


async def test_blurry_image_is_classified_and_stored_but_fails(client: TestClient) -> None:
    data = encode(photo(seed=1, sharp=False))
    status, body = await check(client, data, query="?case_id=10042")
    assert status == 200
    assert body["status"] == "fail"
    assert body["blur_score"] < 100.0
    assert body["message"] == f"Image is too blurry (score={body['blur_score']:.2f}, threshold=100.0)"
    assert len(body["predictions"]) == 7
    assert body["case_id"] == "10042"
    store = client.app[STORE]
    images = store.list_images("user001", "10042")
    assert [i["image_id"] for i in images] == [body["image_id"]]
    assert store.read_image("user001", body["image_id"]) == data


async def test_case_ids_allocate_per_user(client: TestClient) -> None:
    first = await (await client.post("/cases/next-id", headers=USER)).json()
    second = await (await client.post("/cases/next-id", headers=USER)).json()
    other = await (await client.post("/cases/next-id", headers={"X-User-Id": "user002"})).json()
    assert (first, second, other) == ({"case_id": "10000"}, {"case_id": "10001"}, {"case_id": "10000"})
    status, body = await check(client, encode(photo()))
    assert body["case_id"] == "10002"


async def test_query_case_id_wins_over_form_field(client: TestClient) -> None:
    form = upload(encode(photo()))
    form.add_field("case_id", "10077")
    response = await client.post("/check-image?case_id=10088", data=form, headers=USER)
    assert (await response.json())["case_id"] == "10088"
    form = upload(encode(photo()))
    form.add_field("case_id", "10077")
    response = await client.post("/check-image", data=form, headers=USER)
    assert (await response.json())["case_id"] == "10077"


async def test_release_id(client: TestClient) -> None:
    async def release(case_id: Any) -> tuple[int, Any]:
        response = await client.post("/cases/release-id", json={"case_id": case_id}, headers=USER)
        return response.status, await response.json()

    assert await release("10000") == (200, {"status": "skipped", "reason": "missing_counter"})
    await client.post("/cases/next-id", headers=USER)
    await client.post("/cases/next-id", headers=USER)
    assert await release("10000") == (200, {"status": "skipped", "reason": "counter_mismatch", "last_case_id": "10001"})
    assert await release("10001") == (200, {"status": "ok", "case_id": "10001"})
    assert (await (await client.post("/cases/next-id", headers=USER)).json()) == {"case_id": "10001"}
    await check(client, encode(photo()), query="?case_id=10001")
    assert await release("10001") == (200, {"status": "skipped", "reason": "case_in_use"})
    assert await release("10x") == (400, {"detail": "Invalid case_id"})
    assert await release(None) == (400, {"detail": "Invalid case_id"})


async def test_log_case_upserts_and_links_images(client: TestClient) -> None:
    _, image = await check(client, encode(photo()), query="?case_id=10000")
    case = {"case_id": "10000", "image_id": image["image_id"], "status": "Confirmed", "gender": "female",
            "age": "54", "location": "back", "symptoms": ["itch"], "notes": "", "image_decisions": {"x": 1}}
    response = await client.post("/cases", json=case, headers=USER)
    assert response.status == 200
    assert await response.json() == {"status": "ok", "message": "logged", "case_id": "10000", "case_status": "Confirmed"}
    response = await client.post("/cases/uncertain", json={**case, "status": "pending"}, headers=USER)
    assert await response.json() == {"status": "ok", "message": "uncertain_logged", "case_id": "10000",
                                     "case_status": "pending"}
    cases = (await (await client.get("/cases", headers=USER)).json())["cases"]
    assert len(cases) == 1
    stored = cases[0]
    assert stored["entry_type"] == "uncertain" and stored["status"] == "pending"
    assert stored["image_ids"] == [image["image_id"]]
    assert stored["user_id"] == "user001" and stored["user_role"] == "gp" and stored["created_at"]
    assert stored["image_decisions"] == {"x": 1}
    store = client.app[STORE]
    [image_record] = store.list_images("user001", "10000")
    assert image_record["case_status"] == "pending" and image_record["case_entry_type"] == "uncertain"
    assert image_record["gender"] == "female" and image_record["symptoms"] == ["itch"]
    assert "notes" not in image_record


async def test_reject_and_listing_filters(client: TestClient) -> None:
    await client.post("/cases", json={"case_id": "10000", "status": "Confirmed", "created_at": "2026-01-01T00:00:00"},
                      headers=USER)
    await client.post("/cases/uncertain", json={"case_id": "10001", "created_at": "2026-01-02T00:00:00"}, headers=USER)
    response = await client.post("/cases/reject", json={"case_id": "10002", "reason": "not a lesion",
                                                        "created_at": "2026-01-03T00:00:00"}, headers=USER)
    assert await response.json() == {"status": "ok", "message": "rejected_logged"}
    await client.post("/cases", json={"case_id": "20000"}, headers={"X-User-Id": "user002"})

    async def ids(query: str = "", headers: dict[str, str] = USER) -> list[str]:
        response = await client.get(f"/cases{query}", headers=headers)
        assert response.status == 200
        return [c["case_id"] for c in (await response.json())["cases"]]

    assert await ids() == ["10002", "10001", "10000"]
    assert await ids("?status=confirmed") == ["10000"]
    assert await ids("?status=REJECTED") == ["10002"]
    assert await ids("?include_uncertain=false&include_rejected=false") == ["10000"]
    assert await ids("?limit=2") == ["10002", "10001"]
    admin = {"X-User-Id": "boss", "X-User-Role": " Admin "}
    assert sorted(await ids(headers=admin)) == ["10000", "10001", "10002", "20000"]
    response = await client.get("/cases?limit=x", headers=USER)
    assert (response.status, await response.json()) == (
        422, {"detail": "Query parameter 'limit' must be a whole number (0 for all)"})
    response = await client.get("/cases?include_rejected=maybe", headers=USER)
    assert (response.status, await response.json()) == (
        422, {"detail": "Query parameter 'include_rejected' must be true or false"})


async def test_update_case(client: TestClient) -> None:
    await client.post("/cases", json={"case_id": "10000", "status": "pending"}, headers=USER)
    response = await client.put("/cases/10000", json={"status": "Confirmed", "notes": "seen"}, headers=USER)
    assert (response.status, await response.json()) == (200, {"status": "ok", "case_id": "10000"})
    [case] = (await (await client.get("/cases", headers=USER)).json())["cases"]
    assert case["status"] == "Confirmed" and case["notes"] == "seen" and case["updated_at"]
    response = await client.put("/cases/10000", json={}, headers=USER)
    assert (response.status, await response.json()) == (400, {"detail": "No fields to update"})
    response = await client.put("/cases/99999", json={"notes": "x"}, headers=USER)
    assert (response.status, await response.json()) == (404, {"detail": "Case not found"})
    await client.post("/cases/reject", json={"case_id": "10001"}, headers=USER)
    response = await client.put("/cases/10001", json={"notes": "x"}, headers=USER)
    assert (response.status, await response.json()) == (404, {"detail": "Case not found"})
    # Another user's case: only an admin may name its owner.
    response = await client.put("/cases/10000", json={"notes": "y", "user_id": "user001"},
                                headers={"X-User-Id": "user002"})
    assert response.status == 404
    response = await client.put("/cases/10000", json={"notes": "z", "user_id": "user001"},
                                headers={"X-User-Id": "boss", "X-User-Role": "admin"})
    assert (response.status, await response.json()) == (200, {"status": "ok", "case_id": "10000"})
    [case] = (await (await client.get("/cases?include_rejected=false", headers=USER)).json())["cases"]
    assert case["notes"] == "z"


@pytest.mark.parametrize(
    ("headers", "status", "detail"),
    [
        ({}, 400, "Missing X-User-Id header"),
        ({"X-User-Id": "  !!  "}, 400, "Missing X-User-Id header"),
    ],
)
async def test_user_header_is_required(client: TestClient, headers: dict[str, str], status: int, detail: str) -> None:
    response = await client.post("/cases/next-id", headers=headers)
    assert (response.status, await response.json()) == (status, {"detail": detail})


async def test_user_id_is_sanitised(client: TestClient) -> None:
    status, body = await check(client, encode(photo()), headers={"X-User-Id": " user 00-2! "})
    assert status == 200 and body["user_id"] == "user00-2"


@pytest.mark.parametrize(
    ("data", "content_type", "status", "detail"),
    [
        (b"", "image/jpeg", 400, "Invalid image file"),
        (b"this is not an image at all", "image/jpeg", 400, "Invalid image file"),
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/jpeg", 415,
         "Unsupported image type: GIF. Accepted types: JPEG, PNG, WebP"),
        (b"%PDF-1.7\n", "image/png", 415, "Unsupported image type: PDF. Accepted types: JPEG, PNG, WebP"),
    ],
)
async def test_bad_images(client: TestClient, data: bytes, content_type: str, status: int, detail: str) -> None:
    response = await client.post("/check-image", data=upload(data, content_type=content_type), headers=USER)
    assert (response.status, await response.json()) == (status, {"detail": detail})
    assert (await (await client.post("/cases/next-id", headers=USER)).json()) == {"case_id": "10000"}


async def test_truncated_jpeg_is_invalid(client: TestClient) -> None:
    data = encode(photo())
    response = await client.post("/check-image", data=upload(data[: len(data) // 2]), headers=USER)
    assert (response.status, await response.json()) == (400, {"detail": "Invalid image file"})


async def test_body_errors(client: TestClient) -> None:
    response = await client.post("/check-image", data=upload(encode(photo()), name="image"), headers=USER)
    assert (response.status, await response.json()) == (422, {"detail": "Field 'file' is required"})
    response = await client.post("/check-image", json={"file": "x"}, headers=USER)
    assert (response.status, await response.json()) == (422, {"detail": "Expected multipart/form-data with a 'file' part"})
    response = await client.post("/cases", data=b"{not json", headers={**USER, "Content-Type": "application/json"})
    assert (response.status, await response.json()) == (422, {"detail": "Invalid JSON body"})
    response = await client.post("/cases", json={"status": "pending"}, headers=USER)
    assert (response.status, await response.json()) == (422, {"detail": "Field 'case_id' is required"})
    response = await client.post("/cases", json={"case_id": "10000", "symptoms": "itch"}, headers=USER)
    assert (response.status, await response.json()) == (422, {"detail": "Field 'symptoms' must be a list"})
    response = await client.post("/check-image?case_id=abc", data=upload(encode(photo())), headers=USER)
    assert (response.status, await response.json()) == (400, {"detail": "Invalid case_id"})


async def test_routing_errors_are_json(client: TestClient) -> None:
    response = await client.get("/nope", headers=USER)
    assert (response.status, await response.json()) == (404, {"detail": "Not Found"})
    response = await client.get("/check-image", headers=USER)
    assert (response.status, await response.json()) == (405, {"detail": "Method Not Allowed"})


async def test_body_cap(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(server__max_body_bytes=50_000)))
    data = encode(photo(1600, 1200))
    assert len(data) > 50_000
    response = await client.post("/check-image", data=upload(data), headers=USER)
    assert (response.status, await response.json()) == (413, {"detail": "Request body too large (limit 50000 bytes)"})
    response = await client.post("/cases", json={"case_id": "1", "notes": "x" * 60_000}, headers=USER)
    assert (response.status, await response.json()) == (413, {"detail": "Request body too large (limit 50000 bytes)"})


async def test_pixel_cap(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(imaging__max_pixels=100_000)))
    status, body = await check(client, encode(photo(600, 450)))
    assert (status, body) == (413, {"detail": "Image too large: 600x450 pixels exceeds the limit of 100000"})


async def test_api_key(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(), api_keys=ApiKeys.of({"phones": "s3cret"})))
    assert (await client.get("/health")).status == 200
    for headers in ({}, {"X-API-Key": "wrong"}):
        response = await client.post("/cases/next-id", headers=headers)
        assert (response.status, await response.json()) == (401, {"detail": "Invalid API key"})
    response = await client.post("/cases/next-id", headers={"X-API-Key": "s3cret"})
    assert (response.status, await response.json()) == (400, {"detail": "Missing X-User-Id header"})
    response = await client.post("/cases/next-id", headers={"X-API-Key": "s3cret", **USER})
    assert (response.status, await response.json()) == (200, {"case_id": "10000"})


async def test_ready_and_info(client: TestClient, backend: str) -> None:
    response = await client.get("/ready")
    body = await response.json()
    assert response.status == 200 and body["status"] == "ready"
    assert body["checks"] == {"model": True, "store": True}
    info = await (await client.get("/v1/info")).json()
    assert info["model"]["name"] == "tiny" and info["labels"] == list(LABELS)
    assert info["runtime"]["runtime"] == "openvino" and info["runtime"]["inference_precision"] == "f32"
    assert info["selfcheck"]["max_abs_dp"] <= info["selfcheck"]["allowed"]
    assert info["storage"] == {"backend": backend}


async def test_concurrent_case_ids_never_repeat(client: TestClient) -> None:
    import asyncio

    async def one() -> str:
        response = await client.post("/cases/next-id", headers=USER)
        return (await response.json())["case_id"]

    ids = await asyncio.gather(*(one() for _ in range(30)))
    assert sorted(ids) == [str(10000 + i) for i in range(30)]


@pytest.mark.parametrize(
    ("fmt", "mode", "params"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {}),
        ("PNG", "L", {}),
        ("PNG", "I;16", {}),
        ("WEBP", "RGB", {"quality": 90}),
        ("JPEG", "CMYK", {}),
        ("JPEG", "L", {}),
    ],
)
async def test_every_accepted_image_kind(client: TestClient, fmt: str, mode: str, params: dict[str, Any]) -> None:
    image = photo(seed=5)
    if mode == "I;16":
        image = image.convert("L").convert("I;16")
    elif mode != "RGB":
        image = image.convert(mode)
    status, body = await check(client, encode(image, fmt, **params))
    assert status == 200, body
    assert body["status"] in ("success", "fail") and len(body["predictions"]) == 7


async def test_a_client_chosen_case_id_is_never_issued_again(client: TestClient) -> None:
    response = await client.post("/cases", json={"case_id": "10000", "status": "Confirmed"}, headers=USER)
    assert response.status == 200
    _, body = await check(client, encode(photo()), query="?case_id=10003")
    assert body["case_id"] == "10003"
    assert (await (await client.post("/cases/next-id", headers=USER)).json()) == {"case_id": "10004"}
    for bad in ("010000", "1" * 19):
        response = await client.post("/cases", json={"case_id": bad}, headers=USER)
        assert (response.status, await response.json()) == (400, {"detail": "Invalid case_id"})


async def test_numbers_that_are_not_json_are_refused(client: TestClient) -> None:
    for raw in (b'{"case_id": "10000", "blur_score": 1e400}', b'{"case_id": "10000", "blur_score": NaN}'):
        response = await client.post("/cases", data=raw, headers={**USER, "Content-Type": "application/json"})
        assert (response.status, await response.json()) == (422, {"detail": "Invalid JSON body"})
