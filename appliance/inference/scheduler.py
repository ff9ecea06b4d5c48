"""A bounded queue and micro-batching in front of the runtime.

Requests put one preprocessed tensor each into a queue of fixed size (full:
503 with Retry-After, never unbounded latency). One batcher task takes the
first waiting tensor, gathers more for at most `max_wait_s` or until
`max_batch`, and runs the batch on the app's single inference thread; the
runtime itself uses every core for one batch, so more threads would only
contend. The gathering wait lasts only while another request is on its way
(announced with `incoming()` while it decodes) and ends as soon as the batch
is full or nobody else is coming: a lone request never waits for a companion
that cannot come.

During a model swap (appliance/inference/lifecycle.py) two runtimes serve at
once: each job names the runtime its request started on, a batch holds one
runtime's jobs only, and `drained(runtime)` waits until the old one has no
request left, announced or queued, so it can be closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

from ..errors import Overloaded
from .runtimes import Runtime

log = logging.getLogger(__name__)


@dataclass
class _Job:
    tensor: np.ndarray
    future: asyncio.Future[np.ndarray]
    runtime: Runtime


class Scheduler:
    """Turns concurrent single-image requests into batched runtime calls."""

    def __init__(self, runtime: Runtime, executor: Executor, *, max_batch: int, max_wait_s: float, queue_size: int,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.runtime = runtime
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._taken: list[_Job] = []  # jobs out of the queue, not yet answered
        self._incoming = 0  # requests decoding now, whose tensors will follow
        self._incoming_on: Counter[int] = Counter()  # the same, by id() of the runtime they will use
        self._carry: _Job | None = None  # taken, but for another runtime than the batch that took it
        self._pending_on: Counter[int] = Counter()  # jobs queued or taken and not yet answered, by id() of runtime
        self._changed = asyncio.Event()  # a tensor arrived or an announced request ended
        self.batches = 0
        self.images = 0
        self.on_batch = on_batch or (lambda size: None)  # metrics hook: each runtime call's batch size

    def start(self) -> None:
        """Start the batcher task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="inference-batcher")

    async def stop(self) -> None:
        """Stop the batcher; jobs taken or still queued fail with 503."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        leftover = self._taken + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        if self._carry is not None:
            leftover.append(self._carry)
        self._taken, self._carry = [], None
        self._answered(leftover)
        _fail(leftover, Overloaded("The appliance is shutting down"))
        self._changed.set()  # a drain waiting for these jobs sees them gone

    @property
    def depth(self) -> int:
        """Tensors waiting for a batch."""
        return self._queue.qsize()

    @contextmanager
    def incoming(self, runtime: Runtime | None = None) -> Iterator[None]:
        """Announce a request that will `submit` a tensor (to `runtime`; default: `self.runtime`) before this block ends.

        Wrap its decoding: the batcher waits for it, and a swapped-out runtime stays open until it is done.
        """
        key = id(runtime or self.runtime)
        self._incoming += 1
        self._incoming_on[key] += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._incoming_on[key] -= 1
            self._changed.set()

    @contextmanager
    def keep(self, runtime: Runtime) -> Iterator[None]:
        """Keep `runtime` open until this block ends, for a request that will use it but is not decoding yet."""
        self._incoming_on[id(runtime)] += 1
        try:
            yield
        finally:
            self._incoming_on[id(runtime)] -= 1
            self._changed.set()

    def submit(self, tensor: np.ndarray, runtime: Runtime | None = None) -> asyncio.Future[np.ndarray]:
        """Queue one preprocessed image now for `runtime` (default: `self.runtime`); the future is its output row.

        Cancel the future to withdraw the image.
        """
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            job = _Job(tensor, future, runtime or self.runtime)
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded("The inference queue is full; retry shortly") from None
        self._pending_on[id(job.runtime)] += 1
        self._changed.set()
        return future

    async def infer(self, tensor: np.ndarray) -> np.ndarray:
        """The model's output row for one preprocessed image."""
        return await self.submit(tensor)

    @property
    def idle(self) -> bool:
        """Nothing announced, queued or running: a moment the live parity watch may use."""
        return self._incoming == 0 and not any(self._pending_on.values())

    def busy_with(self, runtime: Runtime) -> bool:
        """Whether a request still needs `runtime`: announced, queued, or in the batch running now."""
        return self._incoming_on[id(runtime)] > 0 or self._pending_on[id(runtime)] > 0

    def _answered(self, jobs: list[_Job]) -> None:
        for job in jobs:
            self._pending_on[id(job.runtime)] -= 1

    async def drained(self, runtime: Runtime) -> None:
        """Return once no request needs `runtime` any more (see `busy_with`)."""
        while self.busy_with(runtime):
            self._changed.clear()
            await self._changed.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._carry is not None:
                self._taken, self._carry = [self._carry], None
            else:
                self._taken = [await self._queue.get()]
            # Requests that arrive while a batch runs wait in the queue and
            # form the next batch by themselves; the wait only gathers
            # stragglers still decoding when the queue is not already enough for a batch.
            await self._gather(loop.time() + self.max_wait_s)
            runtime = self._taken[0].runtime
            while len(self._taken) < self.max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                if job.runtime is not runtime:  # a swap is under way: the other runtime's jobs make the next batch
                    self._carry = job
                    break
                self._taken.append(job)
            jobs = [job for job in self._taken if not job.future.cancelled()]
            try:
                if jobs:
                    await self._run_batch(loop, runtime, jobs)
            except Exception as exc:  # whatever fails, this batch answers and the batcher lives on
                log.exception("inference failed for a batch of %d", len(jobs))
                _fail(jobs, exc)
            self._answered(self._taken)
            self._taken = []
            self._changed.set()  # a drain may be waiting for this batch

    async def _gather(self, deadline: float) -> None:
        """Wait until the queue holds a full batch, nobody announced is left, or `deadline`."""
        loop = asyncio.get_running_loop()
        while self._incoming > 0 and self._queue.qsize() < self.max_batch - 1:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, runtime: Runtime, jobs: list[_Job]) -> None:
        batch = np.stack([job.tensor for job in jobs])
        outputs = await loop.run_in_executor(self.executor, runtime.infer, batch)
        self.batches += 1
        self.images += len(jobs)
        for job, row in zip(jobs, outputs, strict=True):  # a runtime answers one row per image
            if not job.future.done():
                job.future.set_result(row)
        self.on_batch(len(jobs))


def _fail(jobs: list[_Job], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
