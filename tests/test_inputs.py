"""Inputs the old server took that the appliance must take the same way (issue 13 item 7)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.security.auth import ApiKeys

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
