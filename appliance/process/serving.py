"""Serving the app until SIGTERM or SIGINT, then draining without cutting an upload short; SIGHUP reloads the model.

aiohttp's `web.run_app` closes every connection the moment shutdown begins,
and a closed connection drops the bytes that arrive after that: a phone photo
still on the wire when systemd stops the service (an upgrade, a reboot) would
be cut, and the clinician would see a network error. Here shutdown goes in
steps instead:

1. stop listening (no new connections), answer `/ready` with 503, and close
   each kept-alive connection after its next answer;
2. let the requests in progress finish, uploads still arriving included, for
   at most `server.shutdown_timeout_s`;
3. aiohttp's own cleanup: idle keep-alive connections close, whatever still
   runs is cancelled, and the app's cleanup contexts flush sync and the store.

SIGHUP (`systemctl reload`, `appliance reload`) swaps the model without
stopping (appliance/inference/lifecycle.py); without a handler it would end
the process and every request in flight.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from typing import Any
from collections.abc import Callable

from aiohttp import web

from ..keys import MODELS, STATE
from ..security.protocol import JsonErrorRunner

log = logging.getLogger("appliance")

# How often the drain looks whether the last request has finished.
DRAIN_POLL_S = 0.05


def run_until_stopped(app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext | None,
                      shutdown_timeout_s: float, on_serving: Callable[[], None],
                      server_options: dict[str, Any]) -> None:
    """Run `app` on host:port until SIGTERM/SIGINT; return once it has drained and closed."""
    asyncio.run(_serve(app, host, port, ssl_context, shutdown_timeout_s, on_serving, server_options))


async def _serve(app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 shutdown_timeout_s: float, on_serving: Callable[[], None], server_options: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def stop_once() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl+C interrupts the drain itself

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_once)
    reloads: set[asyncio.Task[object]] = set()

    def reload() -> None:
        if not app[STATE].ready or stop.is_set():  # ready: the model, and the clinic a swap updates, are up
            log.warning("SIGHUP ignored: the server is still starting, or stopping")
            return
        task: asyncio.Task[object] = loop.create_task(app[MODELS].reload("SIGHUP"), name="model-reload")
        reloads.add(task)  # referenced until done: the loop keeps only weak references to tasks
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    # After our own drain, aiohttp only waits a moment more before cancelling what is left.
    # No access log of aiohttp's: appliance.api.monitoring logs one line per request, with its id.
    # JsonErrorRunner: parser errors (header too long, too many headers) answer JSON, never the request's bytes.
    runner = JsonErrorRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0, **server_options)
    try:
        # Start-up: the cleanup contexts load the model, open the store, ... If one fails,
        # runner.cleanup below still closes those that had started.
        await runner.setup()
        if stop.is_set():  # stopped while starting: never listen, never say READY=1
            return
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        on_serving()
        await stop.wait()
        # The shutdown hooks now (readiness drops, systemd hears STOPPING=1), not after the drain;
        # runner.cleanup runs them again, so they are idempotent.
        await app.shutdown()
        state = app[STATE]
        state.stopping = True  # answers from now on close their connection (no new keep-alive requests)
        await site.stop()  # the listening socket closes; open connections keep being read
        log.info("stopping: no new connections; %d request(s) in progress get up to %.0f s to finish",
                 state.requests_in_progress, shutdown_timeout_s)
        deadline = time.monotonic() + shutdown_timeout_s
        while state.requests_in_progress > 0 and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if state.requests_in_progress > 0:
            log.warning("stopping: %d request(s) still running after %.0f s are cancelled",
                        state.requests_in_progress, shutdown_timeout_s)
    finally:
        for task in reloads:  # a model still loading is not worth waiting for
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
        await runner.cleanup()
