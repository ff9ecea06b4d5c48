"""The application factory: routes, middlewares and each resource's lifetime.

Start-up order (each a cleanup context, so aiohttp tears down in reverse and
only what started): executors, model (fetched from model.url if set; load,
warm up, self-check) with its scheduler, lifecycle (reloads:
appliance/inference/lifecycle.py), proof on this CPU and live parity watch
(appliance/inference/proof.py), store, sync worker (when enabled), then the
clinic service and readiness. Shutdown, in the fixed order STYLE.md asks for:
readiness drops, the listener closes and requests in progress drain
(`server.shutdown_timeout_s`, appliance/process/serving.py), sync finishes its in-flight
uploads (`sync.shutdown_timeout_s`; the outbox keeps the rest), the store is
flushed and closed, the scheduler stops, the runtime is released, and the
threads end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .api import clinic, guards, kserve, monitoring, openapi, ops
from .config import Config, ModelConfig, load_config, wanted_path
from .errors import ApplianceError, PayloadTooLarge, StoreUnavailable
from .inference.lifecycle import FALLBACK, ModelLifecycle, ReloadOutcome
from .inference.model import LoadedModel, load_model, resolve_model_dir
from .inference.proof import ParityWatch, Proof, prove
from .inference.runtimes import create_runtime
from .inference.scheduler import Scheduler
from .keys import (
    API_KEYS,
    AUTH_FAILURES,
    BODY_SLOTS,
    CLINIC,
    CONFIG,
    ERROR_FIELD,
    EXECUTORS,
    METRICS,
    MODELS,
    RATE_LIMITER,
    SCHEDULER,
    STATE,
    STORE,
    SYNC,
    TRIMMER,
    WATCH,
    Executors,
    State,
)
from .modelfetch import fetch_model, mark_verified, model_source
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


def create_app(config: Config, *, api_keys: ApiKeys | None = None, config_path: Path | None = None) -> web.Application:
    """Build the appliance's aiohttp application; resources start when it starts.

    `api_keys` None reads them as `appliance serve` does (`load_api_keys`). `config_path`, the file
    `config` came from, is read again at each model reload for its [model] section (model.pin_version).
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
    app[MODEL_SETTINGS] = _ModelSettings(config, config_path)
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
    app.cleanup_ctx.extend([_executors, _model, _store, _sync, _clinic, _rollout, _memory])
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


class _ModelSettings:
    """Where the model comes from: [model] as at start, or as the config file says now (read at each reload)."""

    def __init__(self, config: Config, path: Path | None) -> None:
        self.config = config
        self.path = path
        self.model: ModelConfig = config.model

    def first(self) -> Path:
        """The version directory to start with: model.path's, or model.url fetched and verified."""
        return resolve_model_dir(model_source(self.model, self.config.bucket), self.model.pin_version)

    def pick(self) -> Path:
        """Re-read [model] (pin_version may have changed), fetch model.url if set, name the version directory.

        A fetched copy becomes the cache's verified one only once it passed its self-check (`commit`).
        """
        if self.path is not None:
            self.model = load_config(self.path).model  # a broken file refuses the reload, naming the key
        model = self.model
        if not model.url:
            return resolve_model_dir(model.path, model.pin_version)
        fetched = fetch_model(model.url, model.cache_dir, self.config.bucket, model.trusted_keys, mark=False)
        return resolve_model_dir(fetched, model.pin_version)

    def commit(self, directory: Path) -> None:
        """`directory` passed: with model.url, a restart now loads it too."""
        if self.model.url:
            mark_verified(self.model.url, self.model.cache_dir, directory)

    def load(self, directory: Path, reference: bool = False) -> LoadedModel:
        """Load, verify, warm up and self-check one version directory (blocking); `reference`: on its reference
        path (the live parity watch's fallback)."""
        return load_model(directory, wanted_path(dataclasses.replace(self.config, model=self.model)),
                          self.config.runtime.selected, max_batch=self.config.inference.max_batch,
                          trusted_keys=self.model.trusted_keys,
                          measure_in=self.machine_dir() if self.model.measure_paths else None,
                          prove_in=self.machine_dir() if self.model.prove_paths else None, reference=reference)

    def prove(self, model: LoadedModel, cancelled: Callable[[], bool]) -> Proof:
        """Run `model`'s pending proof on this machine and cache it (blocking, about a minute)."""
        runtime = self.config.runtime
        return prove(model.manifest, model.proof, lambda: create_runtime(runtime.backend, runtime.selected),
                     max_batch=self.config.inference.max_batch, cancelled=cancelled)

    def machine_dir(self) -> Path:
        """Where what this machine measured is cached (path timings, proofs): beside the compiled-model cache if
        the back end has one (runtime.<name>.cache_dir), else model.cache_dir."""
        compiled = getattr(self.config.runtime.selected, "cache_dir", None)  # each back end's own table decides
        return Path(compiled) if compiled is not None else self.model.cache_dir


MODEL_SETTINGS = web.AppKey("model_settings", _ModelSettings)
WATCH_QUEUE = 4  # sampled photos waiting for the live parity watch; more are dropped (memory stays bounded)


async def _model(app: web.Application) -> AsyncIterator[None]:
    """The served model, its scheduler and its lifecycle; on shutdown the scheduler stops, then the runtimes close."""
    config = app[CONFIG]
    settings = app[MODEL_SETTINGS]
    loop = asyncio.get_running_loop()
    inference = app[EXECUTORS].inference
    model = await loop.run_in_executor(inference, lambda: settings.load(settings.first()))
    if model.manifest.demo:
        log.warning("serving the DEMO model: its answers are not medical predictions")
    scheduler = Scheduler(
        model.runtime,
        inference,
        max_batch=config.inference.max_batch,
        max_wait_s=config.inference.max_wait_ms / 1000.0,
        queue_size=config.inference.queue_size,
        on_batch=app[METRICS].observe_batch,
    )
    scheduler.start()
    lifecycle = ModelLifecycle(model, scheduler, pick=settings.pick, load=settings.load, close_executor=inference,
                               on_swap=lambda new: _serve_model(app, new), commit=settings.commit, prove=settings.prove,
                               load_reference=lambda directory: settings.load(directory, reference=True))
    lifecycle.listeners.append(lambda outcome: _count_reload(app, outcome))
    watcher = ThreadPoolExecutor(1, thread_name_prefix="parity-watch")
    runtime = config.runtime
    watch = ParityWatch(every=config.model.watch_every, window=config.model.watch_window, queue_size=WATCH_QUEUE,
                        idle=lambda: scheduler.idle, create=lambda: create_runtime(runtime.backend, runtime.selected),
                        executor=watcher, fall_back=lambda reason: lifecycle.reload(FALLBACK))
    watch.swapped(model)
    app[MODELS] = lifecycle
    app[SCHEDULER] = scheduler
    app[WATCH] = watch
    lifecycle.prove_soon()
    watching = loop.create_task(watch.run(), name="parity-watch")
    yield
    watching.cancel()
    await asyncio.gather(watching, return_exceptions=True)
    await scheduler.stop()
    await lifecycle.close()
    await loop.run_in_executor(watcher, watch.close)
    await asyncio.to_thread(watcher.shutdown, wait=True)


def _serve_model(app: web.Application, model: LoadedModel) -> None:
    """After a swap: new requests classify on `model` (those running keep the classifier they started with)."""
    app[WATCH].swapped(model, fallback=model.on_reference)
    if CLINIC not in app:  # swapped before the clinic service started (a quick proof): it starts on `model`
        return
    clinic = app[CLINIC]
    clinic.classifier = dataclasses.replace(clinic.classifier, model=model)


def _count_reload(app: web.Application, outcome: ReloadOutcome) -> None:
    app[METRICS].model_reloads.labels(outcome.result).inc()


async def _clinic(app: web.Application) -> AsyncIterator[None]:
    executors = app[EXECUTORS]
    config = app[CONFIG]
    classifier = Classifier(
        app[MODELS].current,
        app[SCHEDULER],
        max_pixels=config.imaging.max_pixels,
        decode_executor=executors.decode,
        observe=app[METRICS].observe_stage,
    )
    app[CLINIC] = Clinic(
        classifier,
        app[STORE],
        config.imaging,
        store_executor=executors.store,
        strip_metadata=config.privacy.strip_metadata_on_store,
        observe=app[METRICS].observe_stage,
        watch=app[WATCH],
    )
    app[STATE].ready = True
    yield
    app[STATE].ready = False


async def _rollout(app: web.Application) -> AsyncIterator[None]:
    """With model.url and model.poll_interval_s, look for a new version in the bucket and swap it in once it passed."""
    model = app[CONFIG].model
    if not model.url or model.poll_interval_s <= 0:
        yield
        return
    task = asyncio.get_running_loop().create_task(app[MODELS].poll(model.poll_interval_s), name="model-poll")
    log.info("model.url: looking for a new version of %s every %g s", model.url, model.poll_interval_s)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


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
