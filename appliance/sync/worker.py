"""The drain loop: uploads outbox jobs with bounded concurrency, retrying with capped backoff.

Each job is read back through the Store at upload time (the current bytes and
record), its image stripped of metadata (`privacy.strip_metadata`), and put
under its deterministic key; only then is the job removed. A failed job is
never dropped: it waits `backoff_delay(attempts)` (exponential, jittered,
at most `sync.retry_max_s` <= 5 minutes) and is tried again, across restarts,
until its `sync.max_attempts`-th failure parks it as a dead letter (kept,
counted in the status and metrics, retried by `appliance sync retry`).
A job whose record does not exist is `gone` (a disk-store save that never
landed) and is removed without an upload.

Nothing here runs on the event loop but the scheduling: outbox and store
calls go to the worker's own two threads, uploads are obstore's async I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar
from collections.abc import Callable

from .. import imaging
from ..buckets.config import BucketConfig
from ..buckets.target import Target
from ..contract import IMAGE_FORMATS
from ..errors import InsufficientStorage, StoreError
from ..storage import Store
from . import keys
from .config import SyncConfig
from .outbox import Backlog, Job, Outbox, iso_time

if TYPE_CHECKING:  # psycopg is imported only when the store is postgres
    from .pgoutbox import PgOutbox

log = logging.getLogger(__name__)

T = TypeVar("T")


def backoff_delay(attempt: int, base_s: float, max_s: float = 300.0, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): base * 2^(attempt-1),
    capped at `max_s`, with "equal jitter" (a random point in the upper half) so boxes that
    failed together do not retry together; never more than `max_s`."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(attempt, 1) - 1, 64))
    return ceiling / 2.0 + rand() * ceiling / 2.0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()[:500]


class SyncWorker:
    """Drains one store's outbox to one target; `run()` as a task, or `drain_once()` from the CLI."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox | PgOutbox,
        target: Target,
        config: SyncConfig,
        *,
        box_id: str,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.target = target
        self.config = config
        self.box_id = box_id
        self.clock = clock
        self.rand = rand
        # Two threads: outbox bookkeeping and store reads (plus metadata stripping) never
        # touch the event loop, and never wait behind the store's request writer pool.
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="sync")
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.backlog = Backlog()
        self.checked_at: float | None = None  # when the read of `backlog` began
        self.uploaded_objects = 0
        self.uploaded_jobs = 0
        self.last_success_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.failing = False
        self.over_budget = False

    # -- lifetime -------------------------------------------------------------

    async def start(self) -> None:
        """Count the backlog (so the first status is true), then start the drain loop as a task."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="sync-worker")

    async def stop(self, timeout_s: float) -> None:
        """Let in-flight uploads finish within `timeout_s`, then cancel; the outbox keeps the rest."""
        self._stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                log.warning("sync: uploads still running after %.1fs at shutdown; they resume at the next start",
                            timeout_s)
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._threads, self.outbox.close)
        self._threads.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Drain due jobs until stopped; sleep `poll_interval_s` (or until the next retry) when idle."""
        while not self._stop.is_set():
            try:
                jobs = await self._call(self.outbox.due, self.clock(), self._batch_size())
                if jobs:
                    await self._run_batch(jobs)
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any single failure; say what it was
                log.exception("sync: drain loop error")
                self._note_error(_one_line(exc))
                jobs = []
            if not jobs:
                await self._sleep(await self._idle_s())

    async def drain_once(self) -> str | None:
        """Upload every job now, ignoring retry times; stop at the first failing batch.

        Returns None when the outbox is empty, else the first error.
        """
        while True:
            jobs = await self._call(self.outbox.due, math.inf, self._batch_size())
            if not jobs:
                await self.refresh()
                return None
            errors = [e for e in await self._run_batch(jobs) if e is not None]
            if errors:
                await self.refresh()
                return errors[0]

    def _batch_size(self) -> int:
        return self.config.max_concurrency * 4

    async def _idle_s(self) -> float:
        next_due = await self._call(self.outbox.next_due_at)
        wait = self.config.poll_interval_s
        if next_due is not None:
            wait = min(wait, max(next_due - self.clock(), 0.0))
        return max(wait, 0.01)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _run_batch(self, jobs: list[Job]) -> list[str | None]:
        limit = asyncio.Semaphore(self.config.max_concurrency)

        async def one(job: Job) -> str | None:
            async with limit:
                if self._stop.is_set() and self._task is not None:
                    return None  # shutting down: leave it for the next start
                return await self._run_job(job)

        return list(await asyncio.gather(*(one(job) for job in jobs)))

    async def _run_job(self, job: Job) -> str | None:
        try:
            objects = await self._upload(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = f"{job.kind} {job.user_id}/{job.ref}: {_one_line(exc)}"
            now = self.clock()
            attempt = job.attempts + 1
            delay = backoff_delay(attempt, self.config.retry_base_s, self.config.retry_max_s, self.rand)
            dead = 0 < self.config.max_attempts <= attempt
            await self._call(lambda: self.outbox.failed(job, error, now, now + delay, dead=dead))
            self._note_error(error)
            if dead:
                log.error("sync: %s (attempt %d = sync.max_attempts); kept as a dead letter until "
                          "`appliance sync retry`", error, attempt)
            else:
                log.warning("sync: %s (attempt %d; next try in %.1fs)", error, attempt, delay)
            return error
        await self._call(self.outbox.done, job)
        self.uploaded_jobs += 1
        self.uploaded_objects += objects
        self.last_success_at = self.clock()
        self.failing = False
        return None

    def _note_error(self, error: str) -> None:
        self.last_error, self.last_error_at, self.failing = error, self.clock(), True

    # -- one job ----------------------------------------------------------------

    async def _upload(self, job: Job) -> int:
        """Upload what the job names, as stored now; the number of objects put (0: gone)."""
        if job.kind == "case":
            record = await self._call(self.store.case_record, job.user_id, job.ref)
            if record is None:
                return 0
            await self.target.put(keys.case_key(self.box_id, job.user_id, job.ref), _json(record), keys.JSON_TYPE)
            return 1
        record = await self._call(self.store.image_record, job.user_id, job.ref)
        if record is None:
            return 0
        count = 0
        if job.kind == "image":
            data, image_format = await self._call(self._stripped_image, job.user_id, job.ref)
            # The image first: a record in the bucket always has its image beside it.
            await self.target.put(keys.image_key(self.box_id, job.user_id, record, image_format), data,
                                  IMAGE_FORMATS[image_format].content_type)
            count += 1
        await self.target.put(keys.image_record_key(self.box_id, job.user_id, record), _json(record), keys.JSON_TYPE)
        return count + 1

    def _stripped_image(self, user_id: str, image_id: str) -> tuple[bytes, str]:
        """The stored image without location/device metadata (lossless), and its format."""
        from ..privacy import strip_metadata  # imported when first needed

        data = self.store.read_image(user_id, image_id)
        if data is None:
            raise StoreError(f"image {image_id} of user {user_id} has a record but no stored bytes")
        image_format = imaging.sniff(data)
        return strip_metadata(data, image_format), image_format

    # -- status -----------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the backlog numbers (one indexed query) and re-evaluate the disk budget."""
        started = self.clock()  # the numbers count every job stored before this moment
        self.backlog = await self._call(self.outbox.backlog)
        self.checked_at = started
        budget = self.config.disk_budget_bytes
        over = budget > 0 and self.backlog.bytes_pending > budget
        if over and not self.over_budget:
            log.error("sync: %d unsynced bytes exceed sync.disk_budget_bytes = %d; policy %r (%s)",
                      self.backlog.bytes_pending, budget, self.config.when_over_budget,
                      "new images are refused with 507" if self.config.when_over_budget == "refuse"
                      else "new images are still stored")
        elif self.over_budget and not over:
            log.warning("sync: back under sync.disk_budget_bytes")
        self.over_budget = over

    def check_budget(self) -> None:
        """Raise InsufficientStorage when over budget with the `refuse` policy (before a new image)."""
        if self.over_budget and self.config.when_over_budget == "refuse":
            raise InsufficientStorage(
                f"Sync backlog over its disk budget ({self.backlog.bytes_pending} of "
                f"{self.config.disk_budget_bytes} bytes unsynced); new images are refused until the bucket "
                f"catches up" + (f" (last error: {self.last_error})" if self.last_error else "")
            )

    def status(self) -> dict[str, Any]:
        """The numbers /ready, /v1/info and `appliance sync status` show; never raises."""
        backlog = self.backlog.as_dict()
        if self.last_error is None:
            last_error, last_error_at = backlog["last_error"], backlog["last_error_at"]
        else:
            last_error, last_error_at = self.last_error, iso_time(self.last_error_at)
        return {
            "enabled": True,
            "state": "failing" if self.failing else (
                "syncing" if self.backlog.jobs > self.backlog.dead_letters else "idle"),
            "target": self.target.describe(),
            "box_id": self.box_id,
            **backlog,
            "checked_at": iso_time(self.checked_at),
            "last_error": last_error,
            "last_error_at": last_error_at,
            "last_success_at": iso_time(self.last_success_at),
            "uploaded_objects": self.uploaded_objects,
            "disk_budget_bytes": self.config.disk_budget_bytes,
            "over_budget": self.over_budget,
            "when_over_budget": self.config.when_over_budget,
        }


def _json(record: dict[str, Any]) -> bytes:
    """A record's object body: sorted keys, so equal records give equal bytes.

    ASCII-escaped: a lone surrogate the client sent in a note is valid JSON
    input but not encodable as UTF-8, and would block its job forever.
    """
    return json.dumps(record, sort_keys=True).encode()


def create_worker(sync: SyncConfig, bucket: BucketConfig, store: Store) -> SyncWorker:
    """Build the worker for `sync` on an open store (blocking: opens the outbox's connection)."""
    from ..buckets import open_target

    target = open_target(sync.url, bucket)
    box_id = sync.box_id or keys.default_box_id()
    return SyncWorker(store, open_outbox(store), target, sync, box_id=box_id)


def open_outbox(store: Store) -> Outbox | PgOutbox:
    """The worker's side of the store's outbox: the SQLite file at its outbox_path, or the postgres table."""
    if store.outbox_kind == "postgres":
        from ..storage.postgres import PostgresStore
        from .pgoutbox import PgOutbox

        assert isinstance(store, PostgresStore)
        return PgOutbox(store)
    return Outbox(store.outbox_path)
