"""Per-route policy, declared once on each handler: which checks a route skips and how loudly it is logged.

The middlewares read a request's policy from the route it matched
(`policy_of`), never from its path. A route without a declaration, and a
request that matched none (404, 405), gets the default: key required, rate
limited, logged.
"""

from __future__ import annotations

import enum
from typing import TypeVar
from collections.abc import Callable

from aiohttp import web

H = TypeVar("H", bound=Callable[..., object])


class Policy(enum.Flag):
    """What a route is exempt from; combine with `|`."""

    DEFAULT = 0
    PUBLIC = enum.auto()  # no API key: probes, the API description, the status page's files
    UNLIMITED = enum.auto()  # never rate limited: probes must always see the truth
    QUIET = enum.auto()  # logged at DEBUG and left out of "recent requests": a 5-second poll must not drown the clinic
    METRICS = enum.auto()  # a metrics-only key may read it: no patient data (/metrics)

    PROBE = PUBLIC | UNLIMITED | QUIET


def route_policy(policy: Policy) -> Callable[[H], H]:
    """Declare `policy` on a handler (put it under the route decorator)."""

    def declare(handler: H) -> H:
        handler.__dict__["policy"] = policy  # a plain attribute; typed access goes through policy_of
        return handler

    return declare


def policy_of(request: web.Request) -> Policy:
    """The policy of the route `request` matched; the default when it matched none."""
    policy = getattr(request.match_info.handler, "policy", Policy.DEFAULT)
    return policy if isinstance(policy, Policy) else Policy.DEFAULT
