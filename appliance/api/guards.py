"""The checks every request passes before a handler: API key, rate limit, body slots; and CORS.

Order, as the contract fixes it: API key (401, or 403 for a metrics key
anywhere but /metrics; 429 first for an address that has spent its wrong
keys, `auth.max_failures_per_minute`), then the rate limit
(429, per key name, or per client address when the API is open), then the
bound on requests holding a body (503). CORS preflights (OPTIONS with
`Access-Control-Request-Method`) need neither a key nor X-User-Id: browsers
never send credentials on them.

CORS uses aiohttp-cors (0.8.1 runs on aiohttp 3.14 without warnings; it adds
an OPTIONS route per resource and its headers in `on_response_prepare`, so
error responses carry them too and the browser can show their `detail`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from collections.abc import Collection

import aiohttp_cors
from aiohttp import hdrs, web

from ..errors import Forbidden, Unauthorized
from ..keys import API_KEYS, AUTH_FAILURES, BODY_SLOTS, KEY_NAME, RATE_LIMITER
from ..security.auth import Role, presented_key
from .policy import Policy, policy_of

if TYPE_CHECKING:  # annotations only; aiohttp's own aliases match what it calls
    from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)

# Headers a browser client may send, and response headers its script may read.
ALLOWED_HEADERS = ("X-API-Key", "Authorization", "X-User-Id", "X-User-Role", "X-Request-Id", "Content-Type")
EXPOSED_HEADERS = ("X-Request-Id", "Retry-After")
PREFLIGHT_MAX_AGE_S = 600


def is_preflight(request: web.Request) -> bool:
    """A CORS preflight: the browser asks before sending the real request."""
    return request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a configured key (X-API-Key or Authorization: Bearer) except on public routes."""
    keys = request.app[API_KEYS]
    if keys and Policy.PUBLIC not in policy_of(request) and not is_preflight(request):
        failures = request.app.get(AUTH_FAILURES)
        address = request.remote or "unknown"
        if failures is not None:
            failures.check(address)
        name = keys.match(presented_key(request.headers))
        if name is None:
            if failures is not None and failures.failed(address):
                log.warning("authentication: %d wrong API keys from %s within a minute; "
                            "answering it 429 until they age out", int(failures.capacity), address)
            raise Unauthorized("Invalid API key")
        request[KEY_NAME] = name
        # By the route's declared policy, not its path: a metrics key reads only what holds no patient data.
        if keys.role_of(name) is Role.METRICS and Policy.METRICS not in policy_of(request):
            raise Forbidden("This key may only read /metrics")
    return await handler(request)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 with Retry-After once a client spends its bucket (`[limits]`)."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None and Policy.UNLIMITED not in policy_of(request) and not is_preflight(request):
        key_name = request.get(KEY_NAME)
        limiter.check(f"key:{key_name}" if key_name else f"addr:{request.remote}")
    return await handler(request)


@web.middleware
async def body_slots_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request with a body holds one of `limits.max_concurrent_bodies` slots until answered, or gets 503."""
    if not request.body_exists:
        return await handler(request)
    with request.app[BODY_SLOTS].hold():
        return await handler(request)


def setup_cors(app: web.Application, allowed_origins: Collection[str]) -> None:
    """Answer preflights and add CORS headers for `allowed_origins` on every route added so far."""
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,  # keys travel in headers, never cookies
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        max_age=PREFLIGHT_MAX_AGE_S,
        allow_methods="*",
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in allowed_origins})
    for route in list(app.router.routes()):
        if route.method != hdrs.METH_OPTIONS:
            cors.add(route)
