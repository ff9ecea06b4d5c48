"""/v1/info and /v1/status report the same running facts (one source, api/ops.running_facts)."""

from __future__ import annotations

from typing import Any

from appliance.app import create_app


async def test_info_and_status_agree_on_what_is_running(aiohttp_client: Any, make_config: Any) -> None:
    client = await aiohttp_client(create_app(make_config()))
    info = await (await client.get("/v1/info")).json()
    status = await (await client.get("/v1/status")).json()
    for section in ("model", "runtime", "served_path", "inference"):
        assert info[section] == status[section], section
    for key in ("version", "ready"):
        assert info["appliance"][key] == status["appliance"][key]
    assert info["appliance"]["ready"] is True and info["inference"]["max_batch"] >= 1
    # Where the views differ on purpose: sync off is {"enabled": false} for /v1/info, null for the status page.
    assert (info["sync"], status["sync"]) == ({"enabled": False}, None)
    assert info["storage"] == {"backend": status["storage"]["backend"]}
