"""What a caller can learn: public probes say ready or not, key roles bound what a key may read (issue 13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.config import parse_config
from appliance.errors import ConfigError
from appliance.keys import STORE
from appliance.security.auth import ApiKeys, Role, load_api_keys, parse_keys


async def test_ready_names_its_checks_and_nothing_else(aiohttp_client: Any, make_config: Any) -> None:
    config = make_config(sync__enabled=False)
    client: TestClient = await aiohttp_client(create_app(config, api_keys=ApiKeys.of({"phones": "k-phones"})))
    response = await client.get("/ready")
    assert (response.status, await response.json()) == (200, {"status": "ready", "checks": {"model": True, "store": True}})
    assert (await client.get("/health")).status == 200
    # The details moved behind the key.
    response = await client.get("/v1/status", headers={"X-API-Key": "k-phones"})
    assert response.status == 200 and "images" in (await response.json())["storage"]


async def test_ready_when_the_store_fails_says_which_check_only(aiohttp_client: Any, make_config: Any) -> None:
    config = make_config()
    app = create_app(config, api_keys=ApiKeys.of({"phones": "k-phones"}))
    client: TestClient = await aiohttp_client(app)
    app[STORE].close()  # every later store call fails, with a message naming the store's files
    response = await client.get("/ready")
    body = await response.json()
    assert (response.status, body) == (503, {"status": "not ready", "checks": {"model": True, "store": False},
                                             "detail": "Not ready: store"})
    assert response.headers["Retry-After"] == "1"
    assert str(config.storage.root) not in await response.text()


KEYS = ApiKeys.of({"phones": "k-phones", "boss": "k-boss", "prom": "k-prom"},
                  roles={"boss": Role.ADMIN, "prom": Role.METRICS})
ADMIN_HEADER = {"X-User-Role": "admin"}


async def log_case(client: TestClient, user: str, case_id: str, key: str | None) -> None:
    headers = {"X-User-Id": user, **({"X-API-Key": key} if key else {})}
    response = await client.post("/cases", json={"case_id": case_id, "notes": f"{user}'s"}, headers=headers)
    assert response.status == 200, await response.text()


async def listed_users(client: TestClient, headers: dict[str, str]) -> set[str]:
    response = await client.get("/cases", headers=headers)
    assert response.status == 200, await response.text()
    return {case["user_id"] for case in (await response.json())["cases"]}


def test_keys_file_roles(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("phones:k-phones\nboss:k-boss:admin\nprom:k-prom:metrics\nlab:k-lab:plain\n")
    keys = load_api_keys(parse_config({"auth": {"keys_file": str(keys_file)}}).auth, environ={"API_KEY": "k-old"})
    assert [keys.role_of(name) for name in ("default", "phones", "boss", "prom", "lab", None)] == [
        Role.PLAIN, Role.PLAIN, Role.ADMIN, Role.METRICS, Role.PLAIN, Role.PLAIN]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("boss:k:root\n", "F line 1: role 'root' is not one of plain, admin, metrics"),
        ("boss:k:admin:x\n", "F line 1: expected 'name:key' or 'name:key:role' (name of letters, digits, '.', '_', "
                             "'-'; key without spaces or ':')"),
        ("boss::admin\n", "F line 1: expected 'name:key' or 'name:key:role' (name of letters, digits, '.', '_', "
                          "'-'; key without spaces or ':')"),
    ],
)
def test_keys_file_role_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keys(text, "F")
    assert str(caught.value) == message


async def test_admin_header_is_honoured_only_on_an_admin_key(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(), api_keys=KEYS))
    await log_case(client, "anna", "10000", "k-phones")
    await log_case(client, "ben", "10000", "k-phones")
    plain = {"X-User-Id": "anna", "X-API-Key": "k-phones", **ADMIN_HEADER}
    assert await listed_users(client, plain) == {"anna"}
    # Editing someone else's case as "admin" lands on the caller's own case of that id, never ben's.
    response = await client.put("/cases/10000", json={"user_id": "ben", "notes": "changed"}, headers=plain)
    assert (response.status, await response.json()) == (200, {"status": "ok", "case_id": "10000"})
    boss = {"X-User-Id": "chief", "X-API-Key": "k-boss"}
    cases = (await (await client.get("/cases", headers={**boss, **ADMIN_HEADER})).json())["cases"]
    assert {c["user_id"]: c["notes"] for c in cases} == {"anna": "changed", "ben": "ben's"}
    assert await listed_users(client, boss) == set()  # an admin key without the header sees its own, as the contract says


async def test_a_metrics_key_reads_metrics_and_nothing_else(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(), api_keys=KEYS))
    metrics = {"X-API-Key": "k-prom"}
    response = await client.get("/metrics", headers=metrics)
    assert response.status == 200 and "appliance_requests_total" in await response.text()
    response = await client.get("/metrics", headers={"Authorization": "Bearer k-prom"})
    assert response.status == 200
    for method, path in (("GET", "/cases"), ("POST", "/cases/next-id"), ("GET", "/v1/status"), ("GET", "/v1/info"),
                         ("PUT", "/cases/10000"), ("POST", "/v2/models/tiny/infer"), ("GET", "/nowhere")):
        response = await client.request(method, path, headers={**metrics, "X-User-Id": "anna", **ADMIN_HEADER})
        field = "error" if path.startswith("/v2/") else "detail"  # KServe v2 names its error field so
        assert (response.status, await response.json()) == (403, {field: "This key may only read /metrics"}), path
    assert (await client.get("/ready")).status == 200  # public routes stay public


async def test_without_keys_the_admin_header_works_as_before(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(), api_keys=ApiKeys()))
    await log_case(client, "anna", "10000", None)
    await log_case(client, "ben", "10000", None)
    assert await listed_users(client, {"X-User-Id": "chief", **ADMIN_HEADER}) == {"anna", "ben"}
    assert await listed_users(client, {"X-User-Id": "anna"}) == {"anna"}
