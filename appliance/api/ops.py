"""Operators' endpoints: readiness (public, check names only) and a description of what is running.

`running_facts` is the one source of what /v1/info and /v1/status (and
/metrics) report about the process, the model and the queue; each view adds
only what it alone shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from .. import __version__
from ..errors import StoreUnavailable
from ..inference.model import LoadedModel
from ..keys import ANSWERED_BY, CONFIG, EXECUTORS, MODELS, SCHEDULER, STATE, STORE, SYNC, WATCH
from ..sync.status import disabled_status
from .policy import Policy, route_policy

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


@routes.get("/ready")
@route_policy(Policy.PROBE)
async def ready(request: web.Request) -> web.Response:
    """200 once the model is loaded, warmed and self-checked and the store answers; else 503.

    Public for probes, so it names its checks and nothing else: the store's
    path, counts, the sync bucket and its last error (which names a user and an
    image) are in /v1/status, behind a key when keys are configured.
    """
    app = request.app
    checks: dict[str, bool] = {"model": app[STATE].ready, "store": False}
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(app[EXECUTORS].store, app[STORE].stats)
        checks["store"] = True
    except Exception as exc:  # any store failure means not ready; why goes to the log, never to the prober
        if not isinstance(exc, StoreUnavailable):  # an outage: the store logs it once, not once per probe
            log.warning("/ready: the store does not answer: %s", exc)
    body: dict[str, Any] = {"status": "ready" if all(checks.values()) else "not ready", "checks": checks}
    if not all(checks.values()):
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        body["detail"] = f"Not ready: {failing}"
        return web.json_response(body, status=503, headers={"Retry-After": "1"})
    return web.json_response(body)


def running_facts(app: web.Application) -> dict[str, Any]:
    """What is running, read now without I/O: the appliance, model, runtime, served path, queue and sync.

    Sections whose resource has not started (no model yet) are absent; `sync`
    is None when sync is off.
    """
    config = app[CONFIG]
    state = app[STATE]
    facts: dict[str, Any] = {
        "appliance": {"version": __version__, "uptime_s": round(time.time() - state.started_at, 1),
                      "ready": state.ready},
    }
    if MODELS in app:
        lifecycle = app[MODELS]
        model = lifecycle.current
        facts.update(model={**model.describe(), **lifecycle.describe()}, runtime=model.runtime.describe(),
                     served_path={**served_path(model), "watch": app[WATCH].describe(model)})
    if SCHEDULER in app:
        scheduler = app[SCHEDULER]
        facts["inference"] = {"max_batch": config.inference.max_batch, "queue_size": config.inference.queue_size,
                              "queue_depth": scheduler.depth, "batches": scheduler.batches,
                              "images": scheduler.images}
    worker = app.get(SYNC)
    facts["sync"] = None if worker is None else worker.status()  # kept current by the worker: no I/O here
    return facts


@routes.get("/v1/info")
async def info(request: web.Request) -> web.Response:
    """The running model, runtime and settings that matter for answers."""
    app = request.app
    model = app[MODELS].current
    config = app[CONFIG]
    facts = running_facts(app)
    return web.json_response(
        {
            **facts,
            "labels": list(model.manifest.labels),
            "selfcheck": {"golden_images": len(model.manifest.golden), "max_abs_dp": model.selfcheck_max_abs_dp,
                          "allowed": model.served.selfcheck_max_abs_dp},
            "imaging": {"blur_threshold": config.imaging.blur_threshold,
                        "blur_full_resolution": config.imaging.blur_full_resolution,
                        "conf_threshold": config.imaging.conf_threshold, "max_pixels": config.imaging.max_pixels,
                        "decode": config.imaging.decode},
            "storage": {"backend": config.storage.backend},
            "sync": facts["sync"] or disabled_status(),
        }
    )


def name_answer(request: web.Request, response: web.Response, model: dict[str, Any]) -> web.Response:
    """Name the model that computed `response` (a `LoadedModel.describe()`): headers, and the request's log line.

    Headers, not body fields: the clinic contract's answer keeps its shape, and any client can read them.
    """
    answered = {"model": str(model["name"]), "model_version": str(model["version"]),
                "served_path": str(model["served_path"])}
    request[ANSWERED_BY] = answered
    response.headers.update({"X-Model-Name": answered["model"], "X-Model-Version": answered["model_version"],
                             "X-Served-Path": answered["served_path"]})
    return response


def served_path(model: LoadedModel) -> dict[str, Any]:
    """Which served path answers and why, with the figures convert measured for it and this machine's proof."""
    path = model.served
    return {"key": path.key, "artifact": path.artifact, "decode": path.decode,
            "inference_precision": path.inference_precision,
            "ms_per_image": path.ms_per_image, "why": model.choice.reason, "passed": path.passed,
            "verification": dict(path.figures), "proof": model.proof.describe(model.manifest)}
