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
