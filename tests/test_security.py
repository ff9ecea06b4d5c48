"""Access: named API keys and their sources, Bearer tokens, the open-API refusal, CORS, rate limits, limits."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.config import parse_config
from appliance.errors import ConfigError, TooManyRequests
from appliance.keys import BODY_SLOTS, STORE
from appliance.security.auth import ApiKeys, is_loopback, load_api_keys, parse_keys
from appliance.security.limits import RateLimiter, server_options

ROOT = Path(__file__).resolve().parent.parent
USER = {"X-User-Id": "user001"}


def test_keys_from_file_environment_and_credential(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.txt"
    keys_file.write_text("# clinic keys\nphones: phone-key-123\n\nprometheus:scrape-key-456\n")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "api-keys").write_text("lab:lab-key-789\n")
    config = parse_config({"auth": {"keys_file": str(keys_file)}})
    keys = load_api_keys(config.auth, environ={"API_KEY": "old-key", "CREDENTIALS_DIRECTORY": str(credentials)})
    assert keys.names == ("default", "phones", "prometheus", "lab")
    assert keys.sources == ("API_KEY", "auth.keys_file", "credential api-keys")
    assert [keys.match(k) for k in ("old-key", "phone-key-123", "scrape-key-456", "lab-key-789")] == [
        "default", "phones", "prometheus", "lab"]
    assert keys.match("phone-key-12") is None and keys.match("") is None and keys.match("phone-key-1234") is None
    assert not load_api_keys(parse_config({}).auth, environ={})
    assert repr(keys).count("phone-key-123") == 0  # only digests are kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("phones\n", "auth.keys_file (F) line 1: expected 'name:key' or 'name:key:role' (name of letters, digits, '.', '_', '-'; key without spaces or ':')"),
        ("a:1\nph ones:x\n", "auth.keys_file (F) line 2: expected 'name:key' or 'name:key:role' (name of letters, digits, '.', '_', '-'; key without spaces or ':')"),
        ("phones:\n", "auth.keys_file (F) line 1: expected 'name:key' or 'name:key:role' (name of letters, digits, '.', '_', '-'; key without spaces or ':')"),
        ("phones:a b\n", "auth.keys_file (F) line 1: expected 'name:key' or 'name:key:role' (name of letters, digits, '.', '_', '-'; key without spaces or ':')"),
        ("phones:a\nphones:b\n", "auth.keys_file (F) line 2: key name 'phones' appears twice"),
    ],
)
def test_keys_file_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keys(text, "auth.keys_file (F)")
    assert str(caught.value) == message


def test_key_source_conflicts(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("default:abc\n")
    config = parse_config({"auth": {"keys_file": str(keys_file)}})
    with pytest.raises(ConfigError, match=r"^auth.keys_file: key name 'default' is also defined by API_KEY$"):
        load_api_keys(config.auth, environ={"API_KEY": "other"})
    keys_file.write_text("phones:same\nlab:same\n")
    with pytest.raises(ConfigError, match=r"^auth.keys_file: key 'lab' has the same value as key 'phones'; "
                                          r"give each client its own key$"):
        load_api_keys(config.auth, environ={})
    missing = parse_config({"auth": {"keys_file": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=r"^auth.keys_file: cannot read .*nope: No such file or directory$"):
        load_api_keys(missing.auth, environ={})


def test_loopback_hosts() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "appliance.local")] == [False] * 4


@pytest.fixture
async def keyed(aiohttp_client: Any, make_config: Any) -> TestClient:
    keys = ApiKeys.of({"phones": "phone-key-123", "prometheus": "scrape-key-456"})
    return await aiohttp_client(create_app(make_config(), api_keys=keys))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": "phone-key-12"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic cGhvbmVzOnBob25lLWtleS0xMjM="},
        {"Authorization": "phone-key-123"},
        {"X-Api-Key": ""},
    ],
)
async def test_wrong_or_missing_key_is_401(keyed: TestClient, headers: dict[str, str]) -> None:
    response = await keyed.post("/cases/next-id", headers={**USER, **headers})
    assert (response.status, await response.json()) == (401, {"detail": "Invalid API key"})


async def test_either_header_carries_the_key_and_logs_name_it(keyed: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.access")
    response = await keyed.post("/cases/next-id", headers={**USER, "X-API-Key": "phone-key-123"})
    assert (response.status, await response.json()) == (200, {"case_id": "10000"})
    response = await keyed.post("/cases/next-id", headers={**USER, "Authorization": "Bearer scrape-key-456"})
    assert (response.status, await response.json()) == (200, {"case_id": "10001"})
    lines = [r for r in caplog.records if r.name == "appliance.access"]
    assert [r.fields["key"] for r in lines] == ["phones", "prometheus"]  # type: ignore[attr-defined]
    assert not any("phone-key-123" in r.getMessage() or "phone-key-123" in str(r.__dict__) for r in caplog.records)


async def test_public_paths_need_no_key(keyed: TestClient) -> None:
    for path in ("/health", "/ready", "/", "/static/status.js", "/static/status.css"):
        assert (await keyed.get(path)).status == 200, path
    for path in ("/v1/info", "/v1/status", "/metrics", "/cases"):
        response = await keyed.get(path, headers=USER)
        assert (response.status, await response.json()) == (401, {"detail": "Invalid API key"}), path


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance", "serve", *args]


def test_serve_refuses_a_lan_address_without_a_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nhost = "0.0.0.0"\nallow_plain_http = true\nallowed_origins = []\n'
                      f'[model]\npath = "{tiny_model_dir}"\n')
    run = subprocess.run(serve_command("--config", str(config)), capture_output=True, text=True, cwd=ROOT,
                         env={"PATH": os.environ.get("PATH", "")}, timeout=60)
    assert run.returncode == 1
    assert run.stderr.splitlines()[-1] == (
        "appliance: error: refusing to serve 0.0.0.0:8000 without an API key: set [auth] keys_file, API_KEY or "
        "the api-keys credential, or pass --insecure (server.allow_insecure = true)")


@pytest.fixture
async def cors(aiohttp_client: Any, make_config: Any) -> TestClient:
    config = make_config(server__allowed_origins=["https://app.clinic.example"])
    return await aiohttp_client(create_app(config, api_keys=ApiKeys.of({"phones": "phone-key-123"})))


async def test_cors_preflight_needs_neither_key_nor_user(cors: TestClient) -> None:
    response = await cors.options("/check-image", headers={
        "Origin": "https://app.clinic.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, x-user-id"})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.clinic.example"
    assert response.headers["Access-Control-Allow-Methods"] == "POST"
    assert set(response.headers["Access-Control-Allow-Headers"].split(",")) == {"X-API-KEY", "X-USER-ID"}
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_cors_refuses_other_origins(cors: TestClient) -> None:
    response = await cors.options("/check-image", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert (response.status, await response.json()) == (403, {"detail": "Forbidden"})
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await cors.post("/cases/next-id", headers={**USER, "X-API-Key": "phone-key-123",
                                                          "Origin": "https://evil.example"})
    assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers


async def test_cors_headers_on_answers_and_errors(cors: TestClient) -> None:
    origin = {"Origin": "https://app.clinic.example"}
    response = await cors.post("/cases/next-id", headers={**USER, **origin})
    assert response.status == 401  # the browser may read the detail of an error too
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.clinic.example"
    response = await cors.post("/cases/next-id", headers={**USER, **origin, "X-API-Key": "phone-key-123"})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.clinic.example"
    assert set(response.headers["Access-Control-Expose-Headers"].split(",")) == {"X-Request-Id", "Retry-After"}


async def test_cors_default_is_any_origin(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(), api_keys=ApiKeys()))
    response = await client.get("/cases", headers={**USER, "Origin": "http://10.0.0.7:3000"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://10.0.0.7:3000"  # aiohttp-cors echoes it


def test_rate_limiter_token_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter(60, 3, clock=lambda: now[0])  # one a second, three at once
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(TooManyRequests) as caught:
        limiter.check("a")
    assert (caught.value.detail, caught.value.headers) == ("Too many requests; retry later", {"Retry-After": "1"})
    limiter.check("b")  # buckets are per client
    now[0] += 1.0
    limiter.check("a")
    with pytest.raises(TooManyRequests):
        limiter.check("a")
    slow = RateLimiter(2, 1, clock=lambda: now[0])  # one every 30 s
    slow.check("a")
    with pytest.raises(TooManyRequests) as caught:
        slow.check("a")
    assert caught.value.headers == {"Retry-After": "30"}


async def test_rate_limit_per_key_name(aiohttp_client: Any, make_config: Any) -> None:
    config = make_config(limits__requests_per_minute=1, limits__burst=2)
    keys = ApiKeys.of({"phones": "phone-key-123", "lab": "lab-key-789"})
    client = await aiohttp_client(create_app(config, api_keys=keys))
    phones = {**USER, "X-API-Key": "phone-key-123"}
    for expected in ("10000", "10001"):
        response = await client.post("/cases/next-id", headers=phones)
        assert (response.status, await response.json()) == (200, {"case_id": expected})
    response = await client.post("/cases/next-id", headers=phones)
    assert (response.status, await response.json()) == (429, {"detail": "Too many requests; retry later"})
    # A whole minute for the next token, less the time the first two requests took (under 1 s, or
    # a few on a loaded machine): the exact arithmetic is the fake-clock test's.
    assert 55 <= int(response.headers["Retry-After"]) <= 60
    response = await client.post("/cases/next-id", headers={**USER, "Authorization": "Bearer lab-key-789"})
    assert response.status == 200  # another key, another bucket
    for _ in range(3):  # probes are never limited
        assert (await client.get("/health")).status == 200 and (await client.get("/ready")).status == 200
    response = await client.post("/cases/next-id", headers={**USER, "X-API-Key": "nope"})
    assert response.status == 401  # the key is checked first


async def test_rate_limit_per_address_when_open(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(limits__requests_per_minute=1, limits__burst=1),
                                             api_keys=ApiKeys()))
    assert (await client.post("/cases/next-id", headers=USER)).status == 200
    response = await client.post("/cases/next-id", headers={"X-User-Id": "someone-else"})
    assert (response.status, await response.json()) == (429, {"detail": "Too many requests; retry later"})


async def test_json_body_cap(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(server__max_json_bytes=1000), api_keys=ApiKeys()))
    response = await client.post("/cases", json={"case_id": "10000", "notes": "x" * 2000}, headers=USER)
    assert (response.status, await response.json()) == (413, {"detail": "JSON body too large (limit 1000 bytes)"})

    async def chunked() -> Any:  # no Content-Length: the cap counts bytes as they come
        yield b'{"case_id": "10000", "notes": "'
        for _ in range(10):
            yield b"y" * 200
        yield b'"}'

    response = await client.post("/cases", data=chunked(), headers={**USER, "Content-Type": "application/json"})
    assert (response.status, await response.json()) == (413, {"detail": "JSON body too large (limit 1000 bytes)"})
    assert client.app[STORE].stats()["cases"] == 0
    response = await client.post("/cases", json={"case_id": "10000", "notes": "fits"}, headers=USER)
    assert response.status == 200


async def test_slow_body_gets_408(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(server__body_timeout_s=0.3), api_keys=ApiKeys()))
    gate = asyncio.Event()

    async def stalled() -> Any:
        yield b'{"case_id": '
        await gate.wait()  # never sends the rest while the server waits
        yield b'"10000"}'

    response = await client.post("/cases", data=stalled(), headers={**USER, "Content-Type": "application/json"})
    assert (response.status, await response.json()) == (408, {"detail": "Request body not received within 0.3 s"})
    gate.set()
    assert client.app[STORE].stats()["cases"] == 0


async def test_bodies_in_progress_are_bounded(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config(limits__max_concurrent_bodies=1), api_keys=ApiKeys()))
    gate = asyncio.Event()
    first_sent = asyncio.Event()

    async def slow() -> Any:
        yield b'{"case_id": '
        first_sent.set()
        await gate.wait()
        yield b'"10000"}'

    holder = asyncio.create_task(client.post("/cases", data=slow(), headers={**USER, "Content-Type": "application/json"}))
    await first_sent.wait()
    while client.app[BODY_SLOTS].in_use == 0:  # the first request's handler has its slot
        await asyncio.sleep(0.01)
    response = await client.post("/cases", json={"case_id": "10001"}, headers=USER)
    assert (response.status, await response.json()) == (503, {"detail": "Too many uploads in progress; retry shortly"})
    assert response.headers["Retry-After"] == "1"
    assert (await client.post("/cases/next-id", headers=USER)).status == 200  # no body, no slot needed
    gate.set()
    first = await holder
    assert first.status == 200
    assert client.app[BODY_SLOTS].in_use == 0


async def test_server_options_bound_headers_and_slow_clients(make_config: Any) -> None:
    """The same keywords `appliance serve` passes to aiohttp: header caps and the slow-client timeout."""
    config = make_config(server__max_header_bytes=1024, server__idle_timeout_s=0.5)
    runner = web.AppRunner(create_app(config, api_keys=ApiKeys()), **server_options(config.server))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 2000 + b"\r\n\r\n")
        assert (await reader.readline()).split()[1] == b"400"
        writer.close()
        await writer.wait_closed()
        # A client that never finishes its headers is cut off after idle_timeout_s.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        await writer.wait_closed()
        # Complete requests are answered as usual.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).split()[1] == b"200"
        writer.close()
        await writer.wait_closed()
    finally:
        await runner.cleanup()
