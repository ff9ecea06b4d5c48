"""The application factory: routes, middlewares and each resource's lifetime.

Start-up order (each a cleanup context, so aiohttp tears down in reverse and
only what started): executors, store, model (load, warm up, self-check),
scheduler, then the clinic service and readiness. Shutdown: aiohttp stops
accepting and drains in-flight requests (`server.shutdown_timeout_s`), then
readiness drops, the scheduler stops, the runtime is released, the store is
flushed and closed, and the threads end.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .api import clinic, ops
from .config import Config
from .errors import ApplianceError, PayloadTooLarge, Unauthorized
from .inference.model import load_model
from .inference.scheduler import Scheduler
from .keys import CLINIC, CONFIG, EXECUTORS, MODEL, SCHEDULER, STATE, STORE, Executors, State
from .services import Clinic
from .storage import open_store

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Reachable without an API key: liveness and readiness probes.
PUBLIC_PATHS = frozenset({"/health", "/ready"})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as JSON `{"detail": ...}`; never a stack trace."""
    try:
        return await handler(request)
    except ApplianceError as exc:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.detail)
        return web.json_response({"detail": exc.detail}, status=exc.status, headers=exc.headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].server.max_body_bytes
        detail = PayloadTooLarge(f"Request body too large (limit {limit} bytes)").detail
        return web.json_response({"detail": detail}, status=413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"detail": exc.reason}, status=exc.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s: unhandled error", request.method, request.path)
        return web.json_response({"detail": "Internal server error"}, status=500)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check X-API-Key when a key is configured (constant-time compare)."""
    expected = request.app[STATE].api_key
    if expected and request.path not in PUBLIC_PATHS:
        given = request.headers.get("X-API-Key", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized("Invalid API key")
    return await handler(request)


def create_app(config: Config, *, api_key: str = "") -> web.Application:
    """Build the appliance's aiohttp application; resources start when it starts."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware],
        client_max_size=config.server.max_body_bytes,
    )
    app[CONFIG] = config
    app[STATE] = State(api_key=api_key)
    app.add_routes(clinic.routes)
    app.add_routes(ops.routes)
    app.cleanup_ctx.extend([_executors, _store, _model, _scheduler, _clinic])
    app.on_shutdown.append(_not_ready)
    return app


async def _executors(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    executors = Executors(
        decode=ThreadPoolExecutor(config.inference.decode_threads, thread_name_prefix="decode"),
        inference=ThreadPoolExecutor(1, thread_name_prefix="inference"),
        store=ThreadPoolExecutor(1, thread_name_prefix="store"),
    )
    app[EXECUTORS] = executors
    yield
    for pool in (executors.decode, executors.inference, executors.store):
        pool.shutdown(wait=True, cancel_futures=True)


async def _store(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].storage
    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(
        app[EXECUTORS].store,
        lambda: open_store(config.backend, config.root, case_id_start=config.case_id_start),
    )
    app[STORE] = store
    yield
    await loop.run_in_executor(app[EXECUTORS].store, store.close)


async def _model(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(
        app[EXECUTORS].inference,
        lambda: load_model(
            config.model.path,
            config.model.artifact,
            config.runtime.backend,
            config.runtime.selected,
            max_batch=config.inference.max_batch,
        ),
    )
    app[MODEL] = model
    if model.manifest.demo:
        log.warning("serving the DEMO model: its answers are not medical predictions")
    yield
    await loop.run_in_executor(app[EXECUTORS].inference, model.runtime.close)


async def _scheduler(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].inference
    scheduler = Scheduler(
        app[MODEL].runtime,
        app[EXECUTORS].inference,
        max_batch=config.max_batch,
        max_wait_s=config.max_wait_ms / 1000.0,
        queue_size=config.queue_size,
    )
    scheduler.start()
    app[SCHEDULER] = scheduler
    yield
    await scheduler.stop()


async def _clinic(app: web.Application) -> AsyncIterator[None]:
    executors = app[EXECUTORS]
    app[CLINIC] = Clinic(
        app[MODEL],
        app[SCHEDULER],
        app[STORE],
        app[CONFIG].imaging,
        decode_executor=executors.decode,
        store_executor=executors.store,
    )
    app[STATE].ready = True
    yield
    app[STATE].ready = False


async def _not_ready(app: web.Application) -> None:
    app[STATE].ready = False
