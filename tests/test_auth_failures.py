"""Wrong keys are limited per client address, by default and with the general rate limit off (issue 13 item 3)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from appliance.app import create_app
from appliance.config import parse_config
from appliance.errors import ConfigError, TooManyRequests
from appliance.security.auth import ApiKeys
from appliance.security.limits import FailedAuthLimiter

KEYS = ApiKeys.of({"phones": "k-phones"})
USER = {"X-User-Id": "user001"}
LIMITED = (429, {"detail": "Too many failed authentications; retry later"})


async def test_the_eleventh_wrong_key_in_a_minute_gets_429(aiohttp_client: Any, make_config: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    config = make_config()
    assert (config.auth.max_failures_per_minute, config.limits.requests_per_minute) == (10, 0)  # the defaults
    client: TestClient = await aiohttp_client(create_app(config, api_keys=KEYS))
    caplog.set_level(logging.WARNING, logger="appliance.api.guards")
    for attempt in range(10):
        response = await client.post("/cases/next-id", headers={**USER, "X-API-Key": f"guess-{attempt}"})
        assert (response.status, await response.json()) == (401, {"detail": "Invalid API key"}), attempt
    for headers in ({"X-API-Key": "guess-10"}, {}, {"X-API-Key": "k-phones"}):  # the right key too: no oracle
        response = await client.post("/cases/next-id", headers={**USER, **headers})
        assert (response.status, await response.json()) == LIMITED
        assert 1 <= int(response.headers["Retry-After"]) <= 6  # one failure refills in 60/10 s
    warnings = [r.getMessage() for r in caplog.records if r.name == "appliance.api.guards"]
    assert warnings == ["authentication: 10 wrong API keys from 127.0.0.1 within a minute; "
                        "answering it 429 until they age out"]  # once per burst, with the address
    # Public probes never need a key, so they are never refused for guessing.
    assert (await client.get("/health")).status == 200 and (await client.get("/ready")).status == 200


async def test_zero_turns_it_off(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(auth__max_failures_per_minute=0), api_keys=KEYS))
    for attempt in range(40):
        response = await client.post("/cases/next-id", headers={**USER, "X-API-Key": f"guess-{attempt}"})
        assert response.status == 401


async def test_an_open_api_has_nothing_to_guess(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(), api_keys=ApiKeys()))
    for _ in range(15):
        response = await client.post("/cases/next-id", headers={**USER, "X-API-Key": "anything"})
        assert response.status == 200


def test_failures_age_out_per_address_and_a_burst_is_logged_once() -> None:
    now = [0.0]
    limiter = FailedAuthLimiter(10, clock=lambda: now[0])
    assert [limiter.failed("10.0.0.5") for _ in range(10)] == [False] * 9 + [True]
    with pytest.raises(TooManyRequests) as caught:
        limiter.check("10.0.0.5")
    assert caught.value.headers == {"Retry-After": "6"}
    limiter.check("10.0.0.6")  # another address is not affected
    now[0] = 6.0  # one failure has aged out: one more try, still within the burst, not logged again
    limiter.check("10.0.0.5")
    assert limiter.failed("10.0.0.5") is False
    with pytest.raises(TooManyRequests):
        limiter.check("10.0.0.5")
    now[0] = 200.0  # fully refilled: the burst is over, the next one is logged again
    limiter.check("10.0.0.5")
    assert [limiter.failed("10.0.0.5") for _ in range(10)][-1] is True


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"auth": {"max_failures_per_minute": -1}})
    assert str(caught.value) == "auth.max_failures_per_minute: expected 0 (off) or more; got -1"


async def test_wrong_keys_and_refusals_are_counted_in_metrics(aiohttp_client: Any, make_config: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(make_config(), api_keys=KEYS))
    for attempt in range(3):
        assert (await client.post("/cases/next-id", headers={**USER, "X-API-Key": f"guess-{attempt}"})).status == 401
    text = await (await client.get("/metrics", headers={"X-API-Key": "k-phones"})).text()
    assert "appliance_auth_wrong_keys_total 3.0" in text.splitlines()
    assert "appliance_auth_refused_total 0.0" in text.splitlines()


def test_the_limiter_counts_what_it_refuses() -> None:
    limiter = FailedAuthLimiter(2, clock=lambda: 0.0)
    limiter.failed("a"), limiter.failed("a")
    with pytest.raises(TooManyRequests):
        limiter.check("a")
    assert (limiter.wrong_keys, limiter.refused) == (2, 1)
