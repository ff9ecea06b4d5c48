"""The application factory: routes, middlewares and each resource's lifetime.

Start-up order (each a cleanup context, so aiohttp tears down in reverse and
only what started): executors, model (fetched from model.url if set; load,
warm up, self-check), scheduler, store, sync worker (when enabled), then the
clinic service and readiness. Shutdown, in the fixed order STYLE.md asks for:
readiness drops, the listener closes and requests in progress drain
(`server.shutdown_timeout_s`, appliance/process/serving.py), sync finishes its in-flight
uploads (`sync.shutdown_timeout_s`; the outbox keeps the rest), the store is
flushed and closed, the scheduler stops, the runtime is released, and the
threads end.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .api import clinic, guards, kserve, monitoring, openapi, ops
from .config import Config, wanted_path
from .errors import ApplianceError, PayloadTooLarge, StoreUnavailable
from .inference.model import load_model
from .inference.scheduler import Scheduler
from .keys import (
    API_KEYS,
    AUTH_FAILURES,
    BODY_SLOTS,
    CLASSIFIER,
    CLINIC,
    CONFIG,
    ERROR_FIELD,
    EXECUTORS,
    METRICS,
    MODEL,
    RATE_LIMITER,
    SCHEDULER,
    STATE,
    STORE,
    SYNC,
    TRIMMER,
    Executors,
    State,
)
from .modelfetch import model_source
from .ops.memory import IdleTrimmer, find_malloc_trim
from .ops.metrics import Metrics
from .security.auth import ApiKeys, load_api_keys
from .security.limits import BodySlots, FailedAuthLimiter, RateLimiter
from .services import Classifier, Clinic
from .storage import open_configured_store

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_body(request: web.Request, detail: str) -> dict[str, str]:
    """`{"detail": ...}` (the clinic contract), or the error field of the sub-app that answers (KServe: "error")."""
    return {request.match_info.apps[-1].get(ERROR_FIELD, "detail"): detail}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as JSON in its API's shape (`{"detail": ...}`; KServe `{"error": ...}`), never a traceback."""
    try:
        return await handler(request)
    except ApplianceError as exc:
        # A database outage is logged by the store, once when it starts and once when it ends.
        if exc.status >= 500 and not isinstance(exc, StoreUnavailable):
            log.error("%s %s: %s", request.method, request.path, exc.detail)
        return web.json_response(_error_body(request, exc.detail), status=exc.status, headers=exc.headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].server.max_body_bytes
        detail = PayloadTooLarge(f"Request body too large (limit {limit} bytes)").detail
        return web.json_response(_error_body(request, detail), status=413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(_error_body(request, exc.reason), status=exc.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s: unhandled error", request.method, request.path)
        return web.json_response(_error_body(request, "Internal server error"), status=500)


def create_app(config: Config, *, api_keys: ApiKeys | None = None) -> web.Application:
    """Build the appliance's aiohttp application; resources start when it starts.

    `api_keys` None reads them as `appliance serve` does (`load_api_keys`).
    """
    app = web.Application(
        middlewares=[
            monitoring.request_middleware,  # outermost: sees the final status of every answer
            error_middleware,
            guards.auth_middleware,
            guards.rate_limit_middleware,
            guards.body_slots_middleware,
        ],
        client_max_size=config.server.max_body_bytes,
    )
    app[CONFIG] = config
    app[STATE] = State()
    app[API_KEYS] = load_api_keys(config.auth) if api_keys is None else api_keys
    app[METRICS] = Metrics()
    app[BODY_SLOTS] = BodySlots(config.limits.max_concurrent_bodies)
    if config.auth.max_failures_per_minute > 0:
        app[AUTH_FAILURES] = FailedAuthLimiter(config.auth.max_failures_per_minute)
    if config.limits.requests_per_minute > 0:
        app[RATE_LIMITER] = RateLimiter(config.limits.requests_per_minute, config.limits.burst)
    app.add_routes(monitoring.routes)
    app.add_routes(clinic.routes)
    app.add_routes(ops.routes)
    app.add_subapp(kserve.PREFIX, kserve.create_kserve_app())
    app.add_routes(openapi.routes)
    app.cleanup_ctx.extend([_executors, _model, _scheduler, _store, _sync, _clinic, _memory])
    app.on_shutdown.append(_not_ready)
    guards.setup_cors(app, config.server.allowed_origins)  # last: it covers every route added above
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
        # Waiting for a thread's last task must not block the loop.
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)


async def _store(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    store = await loop.run_in_executor(app[EXECUTORS].store, lambda: open_configured_store(
        app[CONFIG].storage, outbox=app[CONFIG].sync.enabled, bucket=app[CONFIG].bucket))
    app[STORE] = store
    yield
    await loop.run_in_executor(app[EXECUTORS].store, store.close)


async def _model(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(
        app[EXECUTORS].inference,
        lambda: load_model(
            model_source(config.model, config.bucket),  # model.path, or model.url fetched and verified
            wanted_path(config),
            config.runtime.selected,
            max_batch=config.inference.max_batch,
            trusted_keys=config.model.trusted_keys,
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
        on_batch=app[METRICS].observe_batch,
    )
    scheduler.start()
    app[SCHEDULER] = scheduler
    yield
    await scheduler.stop()


async def _clinic(app: web.Application) -> AsyncIterator[None]:
    executors = app[EXECUTORS]
    config = app[CONFIG]
    classifier = Classifier(
        app[MODEL],
        app[SCHEDULER],
        max_pixels=config.imaging.max_pixels,
        decode_executor=executors.decode,
        observe=app[METRICS].observe_stage,
    )
    app[CLASSIFIER] = classifier
    app[CLINIC] = Clinic(
        classifier,
        app[STORE],
        config.imaging,
        store_executor=executors.store,
        strip_metadata=config.privacy.strip_metadata_on_store,
        observe=app[METRICS].observe_stage,
    )
    app[STATE].ready = True
    yield
    app[STATE].ready = False


async def _memory(app: web.Application) -> AsyncIterator[None]:
    """Give memory back to the OS after bursts of uploads (glibc only; see appliance/ops/memory.py)."""
    trim = find_malloc_trim()
    if trim is None:
        yield
        return
    trimmer = IdleTrimmer(app[BODY_SLOTS], trim)
    app[TRIMMER] = trimmer
    task = asyncio.get_running_loop().create_task(trimmer.run(), name="memory-trimmer")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _not_ready(app: web.Application) -> None:
    app[STATE].ready = False


# -- sync to a bucket (appliance/sync/) ------------------------------------------


async def _sync(app: web.Application) -> AsyncIterator[None]:
    """Start the drain task after the store; on shutdown flush in-flight uploads before the store closes."""
    config = app[CONFIG]
    if not config.sync.enabled:
        yield
        return
    from .sync.worker import create_worker

    loop = asyncio.get_running_loop()
    worker = await loop.run_in_executor(app[EXECUTORS].store, create_worker, config.sync, config.bucket, app[STORE])
    app[SYNC] = worker
    await worker.start()
    log.info("sync: uploading to %s as box %s", config.sync.url, worker.box_id)
    yield
    await worker.stop(config.sync.shutdown_timeout_s)
