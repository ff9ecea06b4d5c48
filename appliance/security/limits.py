"""Per-client rate limiting (token buckets), failed-authentication limiting and the bound on requests holding a body.

Both live in memory, per process: a box serves one clinic, and a restart
forgetting who spent what is harmless.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from typing import Any
from collections.abc import Callable, Iterator

from .config import ServerConfig
from ..errors import Overloaded, TooManyRequests

# Buckets kept at most; the least recently seen client is forgotten first, so
# a flood of spoofed or rotating addresses cannot grow memory without bound.
MAX_CLIENTS = 10_000


class RateLimiter:
    """A token bucket per client: `requests_per_minute` steady, `burst` at once."""

    def __init__(self, requests_per_minute: int, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = requests_per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def check(self, client: str) -> None:
        """Spend one token of `client`'s bucket, or raise 429 saying when to retry."""
        now = self._clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        if tokens < 1.0:
            self._remember(client, tokens, now)
            retry_after_s = max(1, math.ceil((1.0 - tokens) / self.rate_per_s))
            raise TooManyRequests("Too many requests; retry later", retry_after_s=retry_after_s)
        self._remember(client, tokens - 1.0, now)

    def _remember(self, client: str, tokens: float, now: float) -> None:
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)


class FailedAuthLimiter:
    """Wrong keys per client address: `per_minute` failures at once, refilled over a minute, then 429.

    A blocked address gets 429 whatever it presents, its right key included:
    otherwise the one guess that is not refused would tell a guesser it won.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()  # client -> (tokens, at, logged)
        self.wrong_keys = 0  # for /metrics: every wrong key counted, and every request refused for them
        self.refused = 0

    def _now(self, client: str) -> tuple[float, float, bool]:
        now = self._clock()
        tokens, at, logged = self._buckets.pop(client, (self.capacity, now, False))
        tokens = min(self.capacity, tokens + (now - at) * self.rate_per_s)
        return tokens, now, logged and tokens < self.capacity  # a full bucket ends the burst

    def _remember(self, client: str, tokens: float, now: float, logged: bool) -> None:
        self._buckets[client] = (tokens, now, logged)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)

    def check(self, client: str) -> None:
        """429 with Retry-After while `client` has spent its failures; spends nothing."""
        tokens, now, logged = self._now(client)
        self._remember(client, tokens, now, logged)
        if tokens < 1.0:
            self.refused += 1
            retry_after_s = max(1, math.ceil((1.0 - tokens) / self.rate_per_s))
            raise TooManyRequests("Too many failed authentications; retry later", retry_after_s=retry_after_s)

    def failed(self, client: str) -> bool:
        """Count one wrong key from `client`; True once per burst, when it has just spent its last."""
        self.wrong_keys += 1
        tokens, now, logged = self._now(client)
        tokens = max(0.0, tokens - 1.0)
        starts_burst = tokens < 1.0 and not logged
        self._remember(client, tokens, now, logged or starts_burst)
        return starts_burst


class BodySlots:
    """At most `size` requests hold a body (read, decode, infer, store) at once; the rest get 503 at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_use = 0
        self.released = 0  # slots given back so far
        self.last_released_at = 0.0  # time.monotonic() of the latest

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the duration of the block, or 503 with Retry-After when none is free."""
        # Refusing instead of queueing keeps memory bounded: a waiting request
        # would already hold its connection and buffers.
        if self.in_use >= self.size:
            raise Overloaded("Too many uploads in progress; retry shortly")
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self.released += 1
            self.last_released_at = time.monotonic()


def server_options(server: ServerConfig) -> dict[str, Any]:
    """aiohttp server keywords (`web.run_app`, `web.AppRunner`): header size limits and the slow-client timeout.

    aiohttp arms `keepalive_timeout` when a connection opens and re-arms it
    after each answer, and only closes a connection that is waiting for a
    request's headers: so it bounds both idle keep-alive connections and
    clients that send their headers too slowly (slowloris). Slow bodies are
    bounded by `server.body_timeout_s` where handlers read them.
    """
    return {
        "keepalive_timeout": server.idle_timeout_s,
        "max_line_size": server.max_header_bytes,
        "max_field_size": server.max_header_bytes,
        "max_headers": server.max_headers,
    }
