"""What a caller can learn: public probes say ready or not, key roles bound what a key may read (issue 13)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.keys import STORE
from appliance.security.auth import ApiKeys


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
