"""The status page in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

The browser loads `/` from an in-process server on loopback; the test causes some requests, then
waits until the page shows exactly that count, and collects every console message, uncaught
exception and browser log entry to assert there are no errors. No browser is downloaded: `.ci/run`
installs Debian's package.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from appliance.app import create_app
from appliance.security.auth import ApiKeys

from .conftest import encode, photo
from .test_api import upload

USER = {"X-User-Id": "user001"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1"]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A headless Chromium for this module; its DevTools port."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is needed (apt-get install -y chromium; .ci/run installs it)"
    # A pytest temporary directory, not TemporaryDirectory: Chromium's helpers may still write
    # to the profile for a moment after the browser exits.
    profile = tmp_path_factory.mktemp("chromium-profile")
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().count("\n") >= 1):
            assert proc.poll() is None, f"chromium exited {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        yield int(active.read_text().splitlines()[0])
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


class Page:
    """One browser tab over the DevTools protocol: commands, and every error-ish event it reports."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.problems: list[dict[str, Any]] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = message.json()
            if "id" in data:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.problems.append({"kind": "exception", **data["params"]["exceptionDetails"]})
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] in ("error", "warning", "assert"):
                self.problems.append({"kind": "console", "args": data["params"]["args"]})
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] in ("error", "warning"):
                self.problems.append({"kind": "log", **data["params"]["entry"]})

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.pending[ident] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        reply = await asyncio.wait_for(self.pending[ident], 30)
        assert "error" not in reply, reply
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str, expected: Any, timeout_s: float = 30) -> None:
        """Poll until `expression` evaluates to `expected` in the page (the page refreshes every 5 s)."""
        deadline = time.monotonic() + timeout_s
        while (value := await self.evaluate(expression)) != expected:
            assert time.monotonic() < deadline, f"{expression} is {value!r}, expected {expected!r}"
            await asyncio.sleep(0.1)


@pytest.fixture
async def page(chromium: int) -> AsyncIterator[Page]:
    async with aiohttp.ClientSession() as session:
        async with session.put(f"http://127.0.0.1:{chromium}/json/new?about:blank") as response:
            target = await response.json()
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = Page(ws)
            for domain in ("Runtime", "Log", "Page"):
                await tab.send(f"{domain}.enable")
            yield tab
            tab.reader.cancel()
        async with session.get(f"http://127.0.0.1:{chromium}/json/close/{target['id']}"):
            pass


async def cause_requests(base: str, headers: dict[str, str], images: int, ids: int) -> None:
    async with aiohttp.ClientSession() as session:
        for seed in range(images):
            async with session.post(f"{base}/check-image", data=upload(encode(photo(seed=seed))),
                                    headers={**USER, **headers}) as response:
                assert response.status == 200
        for _ in range(ids):
            async with session.post(f"{base}/cases/next-id", headers={**USER, **headers}) as response:
                assert response.status == 200


TEXT = "document.getElementById({!r})?.textContent"


async def test_status_page_shows_live_numbers(aiohttp_server: Any, make_config: Any, page: Page) -> None:
    server = await aiohttp_server(create_app(make_config(), api_keys=ApiKeys()))
    base = f"http://127.0.0.1:{server.port}"
    await cause_requests(base, {}, images=3, ids=4)
    await page.send("Page.navigate", url=f"{base}/")
    await page.wait_for(TEXT.format("requests"), "7")
    assert await page.evaluate(TEXT.format("model-name")) == "tiny"
    assert await page.evaluate(TEXT.format("runtime-name")) == "openvino"
    assert await page.evaluate(TEXT.format("runtime-device")) == "CPU"
    assert await page.evaluate(TEXT.format("storage-images")) == "3"
    assert await page.evaluate(TEXT.format("ready")) == "yes"
    assert await page.evaluate(TEXT.format("sync-state")) == "not configured"
    assert await page.evaluate("document.getElementById('demo-banner').hidden") is False
    assert await page.evaluate("document.getElementById('key-form').hidden") is True
    await cause_requests(base, {}, images=1, ids=0)  # live: the next refresh shows it
    await page.wait_for(TEXT.format("requests"), "8", timeout_s=20)
    assert await page.evaluate(TEXT.format("storage-images")) == "4"
    # Readable on a phone: at 375 px the cards stack in one column and nothing overflows sideways.
    await page.send("Emulation.setDeviceMetricsOverride", width=375, height=800, deviceScaleFactor=2, mobile=True)
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth") is True
    assert await page.evaluate(
        "getComputedStyle(document.getElementById('cards')).gridTemplateColumns.split(' ').length") == 1
    assert page.problems == []


async def test_status_page_asks_for_the_key(aiohttp_server: Any, make_config: Any, page: Page) -> None:
    server = await aiohttp_server(create_app(make_config(), api_keys=ApiKeys.of({"it": "it-key-000"})))
    base = f"http://127.0.0.1:{server.port}"
    await cause_requests(base, {"X-API-Key": "it-key-000"}, images=1, ids=1)
    await page.send("Page.navigate", url=f"{base}/")
    await page.wait_for("document.getElementById('key-form')?.hidden", False)
    assert await page.evaluate(TEXT.format("summary")) == "API key needed"
    await page.evaluate("document.getElementById('key-input').value = 'it-key-000';"
                        "document.getElementById('key-form').requestSubmit()")
    await page.wait_for(TEXT.format("requests"), "2")
    assert await page.evaluate("sessionStorage.getItem('appliance-api-key')") == "it-key-000"
    # The only complaint is the browser noting the first, keyless fetch's 401.
    assert [(p["kind"], p.get("level"), p.get("url", "").endswith("/v1/status")) for p in page.problems] == [
        ("log", "error", True)]


async def test_status_page_names_both_figures_of_each_path_and_the_watch(
        aiohttp_server: Any, make_config: Any, page: Page, tiny_model_dir: Path, tmp_path: Path) -> None:
    from .test_proof import with_verification_set

    version = Path(shutil.copytree(tiny_model_dir, tmp_path / "model" / "1"))
    with_verification_set(version)  # a bar of 1e-5 that the fast decode misses on these photos
    server = await aiohttp_server(create_app(make_config(model__path=str(version), model__cache_dir=str(tmp_path / "m")),
                                             api_keys=ApiKeys()))
    await page.send("Page.navigate", url=f"http://127.0.0.1:{server.port}/")
    await page.wait_for(f"{TEXT.format('served-path')}", "openvino-fp32/exact", timeout_s=60)
    proof = await page.evaluate(TEXT.format("served-proof"))
    assert proof.startswith("proven: proven on this machine at ")
    assert ". openvino-fp32/fast: FAILS here (top-1 100.00%, max |dp| " in proof
    assert ". openvino-fp32/exact: passes here (top-1 100.00%, max |dp| " in proof
    assert proof.count("; converting machine: passed") == 4
    assert await page.evaluate(TEXT.format("served-watch")) == "nothing to watch: the reference path serves"
    assert page.problems == []
