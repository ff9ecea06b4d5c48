"""Typed keys for the objects the application shares between its parts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .config import Config
from .inference.model import LoadedModel
from .inference.scheduler import Scheduler
from .services import Clinic
from .storage import Store


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
    api_key: str = ""


CONFIG = web.AppKey("config", Config)
STATE = web.AppKey("state", State)
EXECUTORS = web.AppKey("executors", Executors)
STORE = web.AppKey("store", Store)
MODEL = web.AppKey("model", LoadedModel)
SCHEDULER = web.AppKey("scheduler", Scheduler)
CLINIC = web.AppKey("clinic", Clinic)
