"""Giving freed memory back to the OS once uploads stop (appliance/ops/memory.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from appliance.app import create_app
from appliance.ops.memory import IdleTrimmer, find_malloc_trim
from appliance.security.auth import ApiKeys
from appliance.security.limits import BodySlots

from .conftest import encode, photo
from .test_api import upload
from .test_monitoring import USER, scrape


async def wait_for(condition: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert condition()


async def test_trims_once_per_quiet_spell_and_never_while_an_upload_is_held() -> None:
    slots = BodySlots(4)
    held_at_trim: list[int] = []
    trimmer = IdleTrimmer(slots, lambda: held_at_trim.append(slots.in_use), idle_s=0.02)
    task = asyncio.create_task(trimmer.run())
    try:
        await asyncio.sleep(0.1)
        assert trimmer.trims == 0  # nothing was ever uploaded: nothing to give back
        with slots.hold():
            await asyncio.sleep(0.1)
            assert trimmer.trims == 0  # an upload is in progress
        await wait_for(lambda: trimmer.trims == 1)
        await asyncio.sleep(0.1)
        assert trimmer.trims == 1  # one trim per quiet spell, not one per check
        with slots.hold(), slots.hold():
            pass
        await wait_for(lambda: trimmer.trims == 2)
        assert held_at_trim == [0, 0]
    finally:
        task.cancel()


async def test_a_failing_trim_is_logged_and_the_trimmer_lives_on(caplog: Any) -> None:
    slots = BodySlots(1)
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise OSError("no such luck")

    trimmer = IdleTrimmer(slots, broken, idle_s=0.02)
    task = asyncio.create_task(trimmer.run())
    try:
        for expected in (1, 2):
            with slots.hold():
                pass
            await wait_for(lambda expected=expected: len(calls) == expected)
        assert not task.done() and trimmer.trims == 0  # only memory really given back is counted
        assert [r.getMessage() for r in caplog.records if r.name == "appliance.ops.memory"] == ["memory: trim failed"] * 2
    finally:
        task.cancel()


async def test_the_server_trims_with_glibc_after_uploads(aiohttp_client: Any, make_config: Any) -> None:
    trim = find_malloc_trim()
    assert trim is not None  # this machine's C library is glibc
    assert trim() in (0, 1)  # malloc_trim's answer: whether memory was released
    client = await aiohttp_client(create_app(make_config(), api_keys=ApiKeys()))
    assert (await scrape(client))[("appliance_memory_trims_total", ())] == 0
    response = await client.post("/check-image", data=upload(encode(photo())), headers=USER)
    assert response.status == 200
    deadline = time.monotonic() + 30
    while (await scrape(client))[("appliance_memory_trims_total", ())] == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (await scrape(client))[("appliance_memory_trims_total", ())] == 1
