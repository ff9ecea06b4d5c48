"""Run an aiohttp application on a real 127.0.0.1 port in a background thread.

For synchronous clients (tritonclient's HTTP client, schemathesis) that cannot
share pytest's event loop: the app gets its own loop and thread, and is torn
down (cleanup contexts included) when the block ends.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager
from collections.abc import Iterator

from aiohttp import web


@contextmanager
def serve_in_thread(app: web.Application) -> Iterator[str]:
    """Serve `app` until the block ends; yields its address as "127.0.0.1:PORT"."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    ready = threading.Event()
    box: dict[str, object] = {}

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["port"] = loop.run_until_complete(start())
        except BaseException as exc:  # hand the start-up failure to the test
            box["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="live-server", daemon=True)
    thread.start()
    ready.wait()
    try:
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        yield f"127.0.0.1:{box['port']}"
    finally:
        if "port" in box:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
