"""A corpus of malformed and hostile requests: each gets its exact status and detail, the server stays
healthy, and nothing is stored for a rejected request.

Every case runs against a fresh app on a real SQLite store; after it, /health must answer 200 and the
store's counts (images, cases, case counters, image bytes) must not have moved.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from PIL import Image

from appliance.app import create_app
from appliance.keys import STORE
from appliance.security.auth import ApiKeys
from appliance.security.protocol import JsonErrorRunner

from .conftest import encode, photo

USER = {"X-User-Id": "user001"}
KEY = "clinic-key-0123456789"
CASE_FIELDS_WRONG = {  # a wrong-typed value for every case field, and what the answer says
    "case_id": ([10000], "Field 'case_id' must be a string"),
    "image_id": ({"a": 1}, "Field 'image_id' must be a string"),
    "blur_score": ("sharp", "Field 'blur_score' must be a number"),
    "predictions": ("nv", "Field 'predictions' must be a list"),
    "device": (["pixel"], "Field 'device' must be a string"),
    "notes": ({"text": "x"}, "Field 'notes' must be a string"),
    "status": (True, "Field 'status' must be a string"),
    "gender": ([], "Field 'gender' must be a string"),
    "age": ({"years": 54}, "Field 'age' must be a string"),
    "location": ([1, 2], "Field 'location' must be a string"),
    "symptoms": ("itch", "Field 'symptoms' must be a list"),
    "image_paths": ({"p": "x"}, "Field 'image_paths' must be a list"),
    "created_at": (["2026"], "Field 'created_at' must be a string"),
}


@dataclass
class Case:
    """One hostile request and the answer it must get."""

    method: str
    path: str
    status: int
    detail: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    keyed: bool = False  # run against an app that requires KEY
    stored_images: int = 0  # > 0 only for hostile-but-valid uploads the contract accepts


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "hostileBOUNDARY") -> tuple[bytes, dict[str, str]]:
    """A multipart body from (name, filename, bytes) parts, built by hand so it can be as odd as needed."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'.encode()
        if filename is not None:
            disposition += b'; filename="' + filename.encode("utf-8", "surrogateescape") + b'"'
        out += b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += b"--" + boundary.encode() + b"--\r\n"
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(data: bytes, *, filename: str = "photo.jpg", query: str = "", status: int, detail: str,
           stored_images: int = 0, headers: dict[str, str] | None = None) -> Case:
    body, content_type = multipart(("file", filename, data))
    return Case("POST", f"/check-image{query}", status, detail, body, {**USER, **content_type, **(headers or {})},
                stored_images=stored_images)


def post_json(path: str, payload: Any, status: int, detail: str, method: str = "POST") -> Case:
    return Case(method, path, status, detail, json.dumps(payload).encode(),
                {**USER, "Content-Type": "application/json"})


def jpeg() -> bytes:
    return encode(photo(seed=7))


def bad_huffman_jpeg() -> bytes:
    """A JPEG whose first Huffman table claims more codes than any table can hold."""
    data = bytearray(jpeg())
    at = data.index(b"\xff\xc4")
    data[at + 5: at + 21] = b"\xff" * 16  # the 16 code-length counts: 4080 codes of 1..16 bits
    return bytes(data)


def bad_crc_png() -> bytes:
    data = bytearray(encode(photo(seed=2), "PNG"))
    at = data.index(b"IDAT")
    data[at + 40] ^= 0xFF  # one byte of the compressed pixels, CRC left as it was
    return bytes(data)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side pixels: 900 MP, about 100 kB on the wire."""
    row = b"\x00" * (1 + side // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def huge_jpeg_header() -> bytes:
    """A JPEG whose frame header says 65000 x 65000 pixels."""
    data = bytearray(jpeg())
    at = data.index(b"\xff\xc0")
    data[at + 5: at + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>'
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
INVALID = "Invalid image file"
UNSUPPORTED = "Unsupported image type: {}. Accepted types: JPEG, PNG, WebP"


def cases() -> dict[str, Callable[[], Case]]:
    data = {
        # --- uploads
        "empty body": lambda: Case("POST", "/check-image", 422, "Expected multipart/form-data with a 'file' part",
                                   b"", dict(USER)),
        "no multipart boundary": lambda: Case("POST", "/check-image", 422,
                                              "Malformed multipart body: boundary missed for Content-Type: multipart/form-data",
                                              b"--x\r\n\r\nabc\r\n--x--\r\n",
                                              {**USER, "Content-Type": "multipart/form-data"}),
        "boundary never appears": lambda: Case("POST", "/check-image", 422,
                                               "Malformed multipart body: Could not find starting boundary b'--zzz'",
                                               b"just some bytes",
                                               {**USER, "Content-Type": "multipart/form-data; boundary=zzz"}),
        "several file parts": lambda: Case("POST", "/check-image", 422, "Only one 'file' part is accepted",
                                           *_split(multipart(("file", "a.jpg", jpeg()), ("file", "b.jpg", jpeg())))),
        "no file part": lambda: Case("POST", "/check-image", 422, "Field 'file' is required",
                                     *_split(multipart(("image", "a.jpg", jpeg())))),
        "JSON instead of multipart": lambda: Case("POST", "/check-image", 422,
                                                  "Expected multipart/form-data with a 'file' part",
                                                  b'{"file": "x"}', {**USER, "Content-Type": "application/json"}),
        "zero-byte file": lambda: upload(b"", status=400, detail=INVALID),
        "truncated JPEG": lambda: upload(jpeg()[:2000], status=400, detail=INVALID),
        "JPEG header only": lambda: upload(b"\xff\xd8\xff\xe0", status=400, detail=INVALID),
        "JPEG with a bad Huffman table": lambda: upload(bad_huffman_jpeg(), status=400, detail=INVALID),
        "PNG with a bad CRC": lambda: upload(bad_crc_png(), filename="a.png", status=400, detail=INVALID),
        "truncated WebP": lambda: upload(encode(photo(seed=3), "WEBP")[:100], filename="a.webp", status=400,
                                         detail=INVALID),
        "30000x30000 PNG bomb": lambda: upload(png_bomb(), filename="bomb.png", status=413,
                                               detail="Image too large: 30000x30000 pixels exceeds the limit of 64000000"),
        "JPEG claiming 65000x65000": lambda: upload(huge_jpeg_header(), status=413,
                                                    detail="Image too large: 65000x65000 pixels exceeds the limit of 64000000"),
        "animated GIF": lambda: upload(animated_gif(), filename="a.gif", status=415, detail=UNSUPPORTED.format("GIF")),
        "SVG with a script": lambda: upload(SVG, filename="a.svg", status=415, detail=UNSUPPORTED.format("SVG")),
        "PDF renamed .jpg": lambda: upload(PDF, status=415, detail=UNSUPPORTED.format("PDF")),
        "HTML": lambda: upload(HTML, filename="a.html", status=400, detail=INVALID),
        "TIFF": lambda: upload(encode(photo(seed=1), "TIFF"), filename="a.tif", status=415,
                               detail=UNSUPPORTED.format("TIFF")),
        "BMP": lambda: upload(encode(photo(seed=1), "BMP"), filename="a.bmp", status=415,
                              detail=UNSUPPORTED.format("BMP")),
        "60 MB upload": lambda: upload(b"\xff\xd8\xff" + b"\x00" * (60 * 1024 * 1024), status=413,
                                       detail="Request body too large (limit 33554432 bytes)"),
        "5 000-digit case_id query": lambda: upload(jpeg(), query="?case_id=" + "1" * 5_000, status=400,
                                                     detail="Invalid case_id"),
        "../ in the case_id query": lambda: upload(jpeg(), query="?case_id=../../etc", status=400,
                                                   detail="Invalid case_id"),
        "case_id form field of 10 kB": lambda: Case("POST", "/check-image", 413,
                                                    "Request body too large (limit 1024 bytes)",
                                                    *_split(multipart(("case_id", None, b"1" * 10_000),
                                                                      ("file", "a.jpg", jpeg())))),
        # hostile but harmless: the image is valid, the file name is never used for anything
        "invalid UTF-8 in the filename": lambda: upload(jpeg(), filename="\udcff\udcfe.jpg", status=200,
                                                        detail="Image processed", stored_images=1),
        "a path in the filename": lambda: upload(jpeg(), filename="../../../../etc/passwd", status=200,
                                                 detail="Image processed", stored_images=1),
        # --- headers
        "no X-User-Id": lambda: Case("POST", "/cases/next-id", 400, "Missing X-User-Id header"),
        "X-User-Id of symbols only": lambda: Case("POST", "/cases/next-id", 400, "Missing X-User-Id header",
                                                  headers={"X-User-Id": "../../;!"}),
        # aiohttp's HTTP parser refuses these before any appliance code runs; JsonErrorRunner (what
        # `appliance serve` runs) answers them in JSON without echoing the bytes (issue 13).
        "20 kB header": lambda: Case("GET", "/cases", 431, "Request line or header too long (limit 8190 bytes)",
                                     headers={**USER, "X-Junk": "a" * 20_000}),
        "20 kB URL": lambda: Case("GET", "/cases?status=" + "a" * 20_000, 431,
                                  "Request line or header too long (limit 8190 bytes)", headers=USER),
        "200 headers": lambda: Case("GET", "/cases", 431, "Too many request headers",
                                    headers={**USER, **{f"X-H{i}": "1" for i in range(200)}}),
        "missing key": lambda: Case("POST", "/cases/next-id", 401, "Invalid API key", headers=USER, keyed=True),
        "wrong key": lambda: Case("POST", "/cases/next-id", 401, "Invalid API key",
                                  headers={**USER, "X-API-Key": "clinic-key-0123456780"}, keyed=True),
        "malformed Bearer": lambda: Case("POST", "/cases/next-id", 401, "Invalid API key",
                                         headers={**USER, "Authorization": f"Bearer{KEY}"}, keyed=True),
        "key as Basic auth": lambda: Case("POST", "/cases/next-id", 401, "Invalid API key",
                                          headers={**USER, "Authorization": f"Basic {KEY}"}, keyed=True),
        "key prefix only": lambda: Case("POST", "/cases/next-id", 401, "Invalid API key",
                                        headers={**USER, "X-API-Key": KEY[:-1]}, keyed=True),
        # --- JSON bodies
        "JSON array": lambda: post_json("/cases", [1, 2], 422, "Invalid JSON body: expected an object"),
        "JSON string": lambda: post_json("/cases", "case", 422, "Invalid JSON body: expected an object"),
        "JSON null": lambda: post_json("/cases", None, 422, "Invalid JSON body: expected an object"),
        "not JSON": lambda: Case("POST", "/cases", 422, "Invalid JSON body", b"{case_id: 1",
                                 {**USER, "Content-Type": "application/json"}),
        "invalid UTF-8 JSON": lambda: Case("POST", "/cases", 422, "Invalid JSON body", b'{"case_id": "\xff\xfe"}',
                                           {**USER, "Content-Type": "application/json"}),
        "NaN in JSON": lambda: Case("POST", "/cases", 422, "Invalid JSON body", b'{"case_id": "1", "blur_score": NaN}',
                                    {**USER, "Content-Type": "application/json"}),
        "JSON nested 100 000 deep": lambda: Case("POST", "/cases", 422, "Invalid JSON body", b"[" * 100_000,
                                                 {**USER, "Content-Type": "application/json"}),
        "1 MB string in notes": lambda: post_json("/cases", {"case_id": "10000", "notes": "x" * 1_100_000}, 413,
                                                  "JSON body too large (limit 1048576 bytes)"),
        "gzip bomb JSON": lambda: Case("POST", "/cases", 413, "JSON body too large (limit 1048576 bytes)",
                                       gzip.compress(b'{"notes": "' + b"x" * (50 * 1024 * 1024) + b'"}'),
                                       {**USER, "Content-Type": "application/json", "Content-Encoding": "gzip"}),
        "case record without case_id": lambda: post_json("/cases", {"status": "pending"}, 422,
                                                         "Field 'case_id' is required"),
        "10 000-digit case_id": lambda: post_json("/cases", {"case_id": "9" * 10_000}, 400, "Invalid case_id"),
        "../ in a case record's case_id": lambda: post_json("/cases", {"case_id": "../10000"}, 400, "Invalid case_id"),
        "symptoms not strings": lambda: post_json("/cases", {"case_id": "10000", "symptoms": [1, {"a": 2}]}, 422,
                                                  "Field 'symptoms' must be a list of strings"),
        "reject with a list reason": lambda: post_json("/cases/reject", {"case_id": "10000", "reason": ["x"]}, 422,
                                                       "Field 'reason' must be a string"),
        # /cases/reject checks predictions as /cases does (issue 13: it once stored any shape).
        "reject with predictions not a list": lambda: post_json("/cases/reject", {"case_id": "10000",
                                                                                  "predictions": "nv"}, 422,
                                                                "Field 'predictions' must be a list"),
        "reject with a prediction of wrong types": lambda: post_json(
            "/cases/reject", {"case_id": "10000", "predictions": [{"label": 7, "confidence": "high"}]}, 422,
            "Field 'predictions' must be a list of {label, confidence} objects"),
        "reject with a prediction that is a string": lambda: post_json(
            "/cases/reject", {"case_id": "10000", "predictions": ["nv"]}, 422,
            "Field 'predictions' must be a list of {label, confidence} objects"),
        "release a non-numeric id": lambda: post_json("/cases/release-id", {"case_id": "abc"}, 400, "Invalid case_id"),
        "release a boolean id": lambda: post_json("/cases/release-id", {"case_id": True}, 400, "Invalid case_id"),
        "release a 10 000-digit id": lambda: post_json("/cases/release-id", {"case_id": "1" * 10_000}, 400,
                                                       "Invalid case_id"),
        "update ../ case": lambda: post_json("/cases/..%2F..%2Fetc", {"notes": "x"}, 400, "Invalid case_id", "PUT"),
        "update a non-numeric case": lambda: post_json("/cases/abc", {"notes": "x"}, 400, "Invalid case_id", "PUT"),
        "update with wrong type": lambda: post_json("/cases/10000", {"notes": 5.5e300, "age": []}, 422,
                                                    "Field 'age' must be a string", "PUT"),
        # --- queries and routing
        "negative limit": lambda: Case("GET", "/cases?limit=-5", 422,
                                       "Query parameter 'limit' must be a whole number (0 for all)", headers=USER),
        "zero limit means all, as the old server": lambda: Case("GET", "/cases?limit=0", 200, "", headers=USER),
        "limit in exponent form": lambda: Case("GET", "/cases?limit=1e3", 422,
                                               "Query parameter 'limit' must be a whole number (0 for all)", headers=USER),
        "huge limit (clamped)": lambda: Case("GET", "/cases?limit=" + "9" * 400, 200, "", headers=USER),
        "include_rejected=maybe": lambda: Case("GET", "/cases?include_rejected=maybe", 422,
                                               "Query parameter 'include_rejected' must be true or false", headers=USER),
        "DELETE a case": lambda: Case("DELETE", "/cases/10000", 405, "Method Not Allowed", headers=USER),
        "unknown path with ../": lambda: Case("GET", "/static/../../etc/passwd", 404, "Not Found", headers=USER),
    }
    for name, (value, detail) in CASE_FIELDS_WRONG.items():
        payload = {"case_id": "10000", name: value}
        data[f"wrong type in {name}"] = (lambda p=payload, d=detail: post_json("/cases", p, 422, d))
    return data


def _split(built: tuple[bytes, dict[str, str]]) -> tuple[bytes, dict[str, str]]:
    body, content_type = built
    return body, {**USER, **content_type}


CASES = cases()


class ServedAsInProduction(TestServer):
    """The test server on the runner `appliance serve` uses, so parser errors are answered as in production."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return JsonErrorRunner(self.app, **kwargs)


def store_counts(client: TestClient) -> dict[str, Any]:
    stats = client.app[STORE].stats()
    # Saves left half-done: sqlite journals files, postgres image saves; each back end has one of them.
    [pending] = [k for k in ("pending_files", "pending_images") if k in stats]
    return {k: stats[k] for k in ("images", "cases", "image_bytes", "users_with_counters", pending)}


# The default store, and PostgreSQL: hostile text reaches its queries as parameters and its records as JSON.
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_input(aiohttp_client: Any, make_config: Any, tmp_path: Path, name: str, backend: str) -> None:
    case = CASES[name]()
    keys = ApiKeys.of({"phones": KEY}) if case.keyed else ApiKeys()
    config = make_config(storage__backend=backend)
    client = await aiohttp_client(ServedAsInProduction(create_app(config, api_keys=keys)))
    before = store_counts(client)
    body = None if case.body is None else io.BytesIO(case.body)  # aiohttp warns about large raw bytes
    response = await client.request(case.method, case.path, data=body, headers=case.headers)
    if case.status == 200:
        assert response.status == 200, await response.text()
        answer = await response.json()
        if case.detail:
            assert answer["message"] == case.detail
    else:
        assert response.content_type == "application/json", await response.text()
        answer = json.loads(await response.text())
        assert (response.status, answer) == (case.status, {"detail": case.detail})
    health = await client.get("/health")
    assert (health.status, await health.json()) == (200, {"status": "ok"})
    after = store_counts(client)
    if case.stored_images:
        assert after["images"] == before["images"] + case.stored_images
        [record] = client.app[STORE].list_images("user001")
        assert client.app[STORE].read_image("user001", record["image_id"]) is not None
        assert not any(p.name in ("passwd",) for p in tmp_path.rglob("*"))  # nothing named after the filename
    else:
        assert after == before


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40
