"""The bounded queue and micro-batching in front of a real runtime."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from appliance.config import parse_config
from appliance.errors import Overloaded
from appliance.inference.runtimes import create_runtime
from appliance.inference.scheduler import Scheduler


class GatedRuntime:
    """A real ONNX Runtime session that waits for the test's go before each batch."""

    def __init__(self, model_file: Path) -> None:
        self.inner = create_runtime("onnxruntime", parse_config({}).runtime.options["onnxruntime"])
        self.inner.load(model_file)
        self.go = threading.Event()
        self.batch_sizes: list[int] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.go.wait(10)
        self.batch_sizes.append(len(batch))
        return self.inner.infer(batch)


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    with ThreadPoolExecutor(1) as pool:
        yield pool


async def test_concurrent_requests_are_batched_and_answered_in_order(tiny_model_dir: Path, executor: ThreadPoolExecutor) -> None:
    runtime = GatedRuntime(tiny_model_dir / "model.onnx")
    scheduler = Scheduler(runtime, executor, max_batch=4, max_wait_s=0.001, queue_size=16)  # type: ignore[arg-type]
    scheduler.start()
    rng = np.random.default_rng(1)
    tensors = [rng.normal(size=(3, 224, 224)).astype(np.float32) for _ in range(9)]
    tasks = [asyncio.ensure_future(scheduler.infer(t)) for t in tensors]
    await asyncio.sleep(0.05)  # the first batch is held at the gate while the rest queue up
    runtime.go.set()
    results = await asyncio.gather(*tasks)
    expected = runtime.inner.infer(np.stack(tensors))
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-6)
    assert sum(runtime.batch_sizes) == 9 and max(runtime.batch_sizes) == 4
    assert scheduler.batches == len(runtime.batch_sizes) < 9
    await scheduler.stop()


async def test_a_full_queue_answers_503_with_retry_after(tiny_model_dir: Path, executor: ThreadPoolExecutor) -> None:
    runtime = GatedRuntime(tiny_model_dir / "model.onnx")
    scheduler = Scheduler(runtime, executor, max_batch=1, max_wait_s=0, queue_size=2)  # type: ignore[arg-type]
    scheduler.start()
    tensor = np.zeros((3, 224, 224), dtype=np.float32)
    running = asyncio.ensure_future(scheduler.infer(tensor))
    await asyncio.sleep(0.05)  # taken by the batcher, held at the gate
    queued = [asyncio.ensure_future(scheduler.infer(tensor)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as caught:
        await scheduler.infer(tensor)
    assert (caught.value.status, caught.value.detail, caught.value.headers) == (
        503, "The inference queue is full; retry shortly", {"Retry-After": "1"})
    runtime.go.set()
    assert len(await asyncio.gather(running, *queued)) == 3
    await scheduler.stop()


class FlakyRuntime(GatedRuntime):
    """The real runtime, but its first batch fails as a lost device would."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(batch))
        if len(self.batch_sizes) == 1:
            raise RuntimeError("device lost")
        return self.inner.infer(batch)


async def test_a_failing_batch_fails_alone_and_the_batcher_lives_on(tiny_model_dir: Path, executor: ThreadPoolExecutor) -> None:
    scheduler = Scheduler(FlakyRuntime(tiny_model_dir / "model.onnx"), executor,  # type: ignore[arg-type]
                          max_batch=1, max_wait_s=0, queue_size=4)
    scheduler.start()
    tensor = np.zeros((3, 224, 224), dtype=np.float32)
    with pytest.raises(RuntimeError, match="device lost"):
        await scheduler.infer(tensor)
    assert (await scheduler.infer(tensor)).shape == (7,)
    await scheduler.stop()


async def test_the_batcher_waits_for_announced_requests_and_never_for_none(
        tiny_model_dir: Path, executor: ThreadPoolExecutor) -> None:
    runtime = GatedRuntime(tiny_model_dir / "model.onnx")
    runtime.go.set()
    # A gathering wait far longer than the test may take: it passes only if the batcher
    # stops waiting as soon as nobody more can come, or the batch is full.
    scheduler = Scheduler(runtime, executor, max_batch=3, max_wait_s=3600, queue_size=8)  # type: ignore[arg-type]
    scheduler.start()
    rng = np.random.default_rng(2)
    tensors = [rng.normal(size=(3, 224, 224)).astype(np.float32) for _ in range(6)]
    expected = runtime.inner.infer(np.stack(tensors))

    # Alone: nobody announced, so no wait at all.
    np.testing.assert_allclose(await asyncio.wait_for(scheduler.infer(tensors[0]), 60), expected[0], atol=1e-6)
    # One request queued while another decodes: it waits for that one, which ends the wait
    # by ending its announcement (here after queueing its tensor), and they share a batch.
    with scheduler.incoming():
        first = scheduler.submit(tensors[1])
        await asyncio.sleep(0.05)
        assert not first.done()  # held for the announced request
        second = scheduler.submit(tensors[2])
    np.testing.assert_allclose(await asyncio.wait_for(asyncio.gather(first, second), 60), expected[1:3], atol=1e-6)
    # An announced request that never queues (its upload was refused) also ends the wait.
    with scheduler.incoming():
        third = scheduler.submit(tensors[3])
        await asyncio.sleep(0.05)
    np.testing.assert_allclose(await asyncio.wait_for(third, 60), expected[3], atol=1e-6)
    # A full batch ends the wait though more are announced.
    with scheduler.incoming(), scheduler.incoming():
        batch = [scheduler.submit(t) for t in tensors[3:6]]
        np.testing.assert_allclose(await asyncio.wait_for(asyncio.gather(*batch), 60), expected[3:6], atol=1e-6)
    assert runtime.batch_sizes == [1, 2, 1, 3]
    await scheduler.stop()
