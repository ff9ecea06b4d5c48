"""Operators' view: request ids and the per-request log line, `/metrics`, `/v1/status` and the status page.

The status page (`/`, `/static/*`) is public: it is a static shell holding no
data. The figures it shows come from `/v1/status`, which like every API
endpoint needs a key when keys are configured; the page asks for one and
keeps it in the tab's sessionStorage. That keeps a single rule (only the
probes, /openapi.json and the page's files are open) and keeps infrastructure
details (sync errors, storage paths) away from anyone who merely reaches the box.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import shutil
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..contract import sanitize_user_id
from ..keys import (API_KEYS, ANSWERED_BY, AUTH_FAILURES, BODY_SLOTS, CONFIG, EXECUTORS, KEY_NAME, METRICS, REQUEST_ID,
                    STATE, STORE, TRIMMER)
from ..security.tls import fingerprint_sha256
from .ops import running_facts
from .policy import Policy, policy_of, route_policy

log = logging.getLogger("appliance.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

routes = web.RouteTableDef()

# The status page's files; open without a key (they hold no data).
STATIC = {
    "/": ("status.html", "text/html"),
    "/static/status.css": ("status.css", "text/css"),
    "/static/status.js": ("status.js", "application/javascript"),
}
# Only the page's own origin; no inline script or style, nothing from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def route_of(request: web.Request) -> str:
    """The matched route's template (`/cases/{case_id}`), never the raw path: bounded label values."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request an id (honouring a sane `X-Request-Id`), echo it, time it, count it, log one line."""
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    metrics = request.app[METRICS]
    started = time.monotonic()
    status = 500
    metrics.in_progress.inc()
    request.app[STATE].requests_in_progress += 1
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        if request.app[STATE].stopping:
            response.force_close()  # draining: a kept-alive client must not start another request here
        return response
    except web.HTTPException as exc:  # redirects and the like, which the error middleware lets through
        status = exc.status
        exc.headers["X-Request-Id"] = request_id
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's convention)
        raise
    finally:
        metrics.in_progress.dec()
        request.app[STATE].requests_in_progress -= 1
        seconds = time.monotonic() - started
        route = route_of(request)
        quiet = Policy.QUIET in policy_of(request)
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.request_seconds.labels(route).observe(seconds)
        if not quiet:
            metrics.recent.add(seconds, status)
        log.log(logging.DEBUG if quiet else logging.INFO,
                "%s %s %d %.1fms", request.method, route, status, seconds * 1000.0,
                extra={"fields": {
                    "request_id": request_id, "method": request.method, "route": route, "status": status,
                    "duration_ms": round(seconds * 1000.0, 1), "key": request.get(KEY_NAME),
                    "client": request.remote, "user": _user(request), **request.get(ANSWERED_BY, {}),
                }})


def _user(request: web.Request) -> str | None:
    # The contract's rule, so the log shows the id the store saw; never other headers or the body.
    return sanitize_user_id(request.headers.get("X-User-Id", "")) or None


async def gather_facts(app: web.Application) -> dict[str, Any]:
    """What /metrics and /v1/status report, read now: `running_facts`, and the store's and the process's figures."""
    running = running_facts(app)
    facts: dict[str, Any] = {**running, "uptime_s": running["appliance"]["uptime_s"],
                             "ready": running["appliance"]["ready"], "bodies_in_progress": app[BODY_SLOTS].in_use}
    if TRIMMER in app:
        facts["memory_trims"] = app[TRIMMER].trims
    if AUTH_FAILURES in app:
        failures = app[AUTH_FAILURES]
        facts["auth_failures"] = {"wrong_keys": failures.wrong_keys, "refused": failures.refused}
    if STORE in app:
        facts["storage"] = await asyncio.get_running_loop().run_in_executor(app[EXECUTORS].store, _store_figures, app)
    return facts


def _store_figures(app: web.Application) -> dict[str, Any]:
    root = app[CONFIG].storage.root
    try:
        figures = dict(app[STORE].stats())
    except Exception as exc:  # the page must still load when the store is failing; it says why
        figures = {"error": str(exc)}
    try:
        disk = shutil.disk_usage(root)
        figures.update(disk_total_bytes=disk.total, disk_free_bytes=disk.free)
    except OSError:
        pass
    return figures


@routes.get("/metrics")
@route_policy(Policy.QUIET | Policy.METRICS)
async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this app's registry."""
    app = request.app
    app[METRICS].facts = await gather_facts(app)
    return web.Response(body=app[METRICS].render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@routes.get("/v1/status")
@route_policy(Policy.QUIET)
async def status(request: web.Request) -> web.Response:
    """The status page's figures: no patient data, only counts, timings and identities of software."""
    app = request.app
    config = app[CONFIG]
    facts = await gather_facts(app)
    return web.json_response({
        "appliance": facts["appliance"],
        "model": facts.get("model"),
        "served_path": facts.get("served_path"),
        "runtime": facts.get("runtime", {}),
        "recent": app[METRICS].recent.summary(),
        "inference": facts.get("inference"),
        "storage": {"backend": config.storage.backend, **(facts.get("storage") or {})},
        "sync": facts["sync"],
        "security": {"api_keys": len(app[API_KEYS].names), "tls": config.server.tls_cert_file is not None,
                     "tls_fingerprint_sha256": _fingerprint(config.server.tls_cert_file)},
    })


@functools.lru_cache(maxsize=4)
def _fingerprint(cert_file: Path | None) -> str | None:
    # Read once: the server loaded this file at start, and keeps serving that certificate until it restarts.
    return None if cert_file is None else fingerprint_sha256(cert_file)


def _page_handler(filename: str, content_type: str) -> Handler:
    body = resources.files(__package__).joinpath("static").joinpath(filename).read_bytes()  # one name each: 3.10

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)

    serve.__doc__ = f"The status page's {filename}."
    return serve


for _path, (_file, _type) in STATIC.items():
    routes.get(_path)(route_policy(Policy.PUBLIC | Policy.QUIET)(_page_handler(_file, _type)))
