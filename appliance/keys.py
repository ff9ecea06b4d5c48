"""Typed keys for the objects the application shares between its parts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from .config import Config
from .inference.lifecycle import ModelLifecycle
from .inference.proof import ParityWatch
from .inference.scheduler import Scheduler
from .ops.memory import IdleTrimmer
from .ops.metrics import Metrics
from .security.auth import ApiKeys
from .security.limits import BodySlots, FailedAuthLimiter, RateLimiter
from .services import Clinic
from .storage import Store
from .sync.worker import SyncWorker


@dataclass
class Executors:
    """The thread pools the app owns: decoding, inference (one thread), the store writer (one thread)."""

    decode: ThreadPoolExecutor
    inference: ThreadPoolExecutor
    store: ThreadPoolExecutor


@dataclass
class State:
    """Process-wide facts for /ready and /v1/info."""

    started_at: float = field(default_factory=time.time)
    ready: bool = False
    requests_in_progress: int = 0  # the shutdown drain waits for this to reach 0
    stopping: bool = False  # set when the drain begins: every answer then closes its connection


CONFIG = web.AppKey("config", Config)
STATE = web.AppKey("state", State)
EXECUTORS = web.AppKey("executors", Executors)
STORE = web.AppKey("store", Store)
# The served model (`.current`) and the one way to swap it (`.reload`); a swap replaces CLINIC.classifier too.
MODELS = web.AppKey("models", ModelLifecycle)
SCHEDULER = web.AppKey("scheduler", Scheduler)
WATCH = web.AppKey("watch", ParityWatch)  # the live parity watch (inference/proof.py)
CLINIC = web.AppKey("clinic", Clinic)

# Hardening and monitoring (appliance/security/, appliance/ops/metrics.py).
API_KEYS = web.AppKey("api_keys", ApiKeys)
METRICS = web.AppKey("metrics", Metrics)
BODY_SLOTS = web.AppKey("body_slots", BodySlots)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)  # absent when limits.requests_per_minute = 0
AUTH_FAILURES = web.AppKey("auth_failures", FailedAuthLimiter)  # absent when auth.max_failures_per_minute = 0
TRIMMER = web.AppKey("trimmer", IdleTrimmer)  # absent where the C library cannot trim (not glibc)
# Per request: its id (echoed as X-Request-Id) and the name of the API key it presented.
REQUEST_ID = web.RequestKey("request_id", str)
KEY_NAME = web.RequestKey("key_name", str)
# Per classification: the model name, version and served path that answered (its log line carries them).
ANSWERED_BY = web.RequestKey("answered_by", dict)
SYNC = web.AppKey("sync", SyncWorker)  # present only when sync.enabled

# Set on a sub-app whose protocol names its error field otherwise (KServe v2: "error"); else "detail".
ERROR_FIELD = web.AppKey("error_field", str)
