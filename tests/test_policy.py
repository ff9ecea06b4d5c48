"""Per-route policy is declared on the route, and the middlewares and the OpenAPI document follow it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from appliance.api.openapi import document
from appliance.api.policy import Policy
from appliance.app import create_app
from appliance.config import parse_config
from appliance.security.auth import ApiKeys

EXPECTED = {
    "/health": Policy.PROBE,
    "/ready": Policy.PROBE,
    "/openapi.json": Policy.PUBLIC,
    "/v2/health/live": Policy.PUBLIC,
    "/v2/health/ready": Policy.PUBLIC,
    "/": Policy.PUBLIC | Policy.QUIET,
    "/static/status.css": Policy.PUBLIC | Policy.QUIET,
    "/static/status.js": Policy.PUBLIC | Policy.QUIET,
    "/metrics": Policy.QUIET | Policy.METRICS,
    "/v1/status": Policy.QUIET,
}


def make_app(model_dir: Path, root: Path, **limits: Any) -> web.Application:
    config = parse_config({"model": {"path": str(model_dir)}, "storage": {"root": str(root)}, "limits": limits})
    return create_app(config, api_keys=ApiKeys.of({"phones": "s3cret"}))


def test_each_route_declares_its_policy_and_the_document_agrees(tiny_model_dir: Path, tmp_path: Path) -> None:
    doc = document()
    seen = set()
    for route in make_app(tiny_model_dir, tmp_path).router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in (hdrs.METH_HEAD, hdrs.METH_OPTIONS):
            continue
        policy = getattr(route.handler, "policy", Policy.DEFAULT)
        assert policy == EXPECTED.get(path, Policy.DEFAULT), path
        public_in_doc = doc["paths"][path][route.method.lower()].get("security") == []
        assert public_in_doc == (Policy.PUBLIC in policy), path
        seen.add(path)
    assert set(EXPECTED) <= seen


async def test_errors_before_the_handler_take_the_answering_api_s_shape(aiohttp_client: Any, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    client = await aiohttp_client(make_app(tiny_model_dir, tmp_path, requests_per_minute=60, burst=2))
    assert (await client.get("/v2/health/live")).status == 200  # public
    response = await client.get("/v2")
    assert (response.status, await response.json()) == (401, {"error": "Invalid API key"})
    response = await client.get("/v1/info")
    assert (response.status, await response.json()) == (401, {"detail": "Invalid API key"})
    key = {"X-API-Key": "s3cret"}
    statuses = [(await client.get("/v2", headers=key)).status for _ in range(3)]
    assert statuses[:2] == [200, 200]
    response = await client.get("/v2", headers=key)
    assert response.status == 429 and list(await response.json()) == ["error"]
    response = await client.get("/v1/info", headers=key)
    assert response.status == 429 and list(await response.json()) == ["detail"]
    for _ in range(5):  # probes are never limited
        assert (await client.get("/health")).status == 200
