"""Inputs (issue 13 item 7): limit=0 lists all as the old server did; parser errors answer JSON, echoing nothing."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.security.auth import ApiKeys
from appliance.security.limits import server_options
from appliance.security.protocol import JsonErrorRunner

USER = {"X-User-Id": "user001"}


async def test_limit_zero_lists_every_case(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(), api_keys=ApiKeys()))
    for number in range(105):
        response = await client.post("/cases", json={"case_id": str(10000 + number)}, headers=USER)
        assert response.status == 200
    listed = {}
    for query in ("", "?limit=0", "?limit=000", "?limit=3"):
        response = await client.get(f"/cases{query}", headers=USER)
        assert response.status == 200, await response.text()
        listed[query] = len((await response.json())["cases"])
    assert listed == {"": 100, "?limit=0": 105, "?limit=000": 105, "?limit=3": 3}


SECRET = b"patient-Jane-Doe-1957"  # must never come back in an answer


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes after a parser error)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture
async def served_port(make_config: Any) -> AsyncIterator[int]:
    """The app behind the runner `appliance serve` uses, with its server options (1 KiB header cap)."""
    config = make_config(server__max_header_bytes=1024, server__max_headers=20)
    runner = JsonErrorRunner(create_app(config, api_keys=ApiKeys()), access_log=None, **server_options(config.server))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("request_bytes", "status", "detail"),
    [
        (b"GET /health?q=" + SECRET * 60 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431,
         "Request line or header too long (limit 1024 bytes)"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Notes: " + SECRET * 60 + b"\r\n\r\n", 431,
         "Request line or header too long (limit 1024 bytes)"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-" + SECRET * 60 + b": 1\r\n\r\n", 431,
         "Request line or header too long (limit 1024 bytes)"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: " % i + SECRET + b"\r\n" for i in range(30))
         + b"\r\n", 431, "Too many request headers"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header " + SECRET + b": 1\r\n\r\n", 400, "Malformed HTTP request"),
        (SECRET + b"\x00\x01 not http\r\n\r\n", 400, "Malformed HTTP request"),
    ],
    ids=["request line", "header value", "header name", "too many headers", "invalid header", "not HTTP"],
)
async def test_parser_errors_answer_json_without_echoing(served_port: int, request_bytes: bytes, status: int,
                                                         detail: str) -> None:
    got_status, headers, body = await exchange(served_port, request_bytes)
    assert (got_status, headers["content-type"], json.loads(body)) == (
        status, "application/json; charset=utf-8", {"detail": detail})
    assert SECRET not in body
    # The server is unharmed.
    assert (await exchange(served_port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))[0] == 200
