"""Dynamic batching: concurrent requests' texts gathered into onnxruntime calls, by token length.

A request hands over its encoded texts and waits. One loop takes what is queued: it starts with the
oldest request and keeps gathering for at most ``max_queue_delay_ms`` or until ``max_batch_size``
texts are waiting; then it sorts every gathered text by token length and cuts the sorted list into
calls of at most ``max_batch_size`` texts, so a batch pads its rows to a length close to their own.
Calls run one at a time on a worker thread (onnxruntime's intra-op threads already use every
core), and each request gets its own rows back, in its own order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from trimformer.runtime.encoding import EncodedText
from trimformer.serving.metrics import Metrics

__all__ = ["Batcher", "Batching"]

# A call pads every row to its longest; a new call starts where padding would pass this share of
# the real tokens (sorted rows, so each new row is the longest so far).
PADDING_BUDGET = 0.25

Infer = Callable[[Sequence[EncodedText]], np.ndarray]


@dataclass(frozen=True)
class Batching:
    """``enabled``: gather concurrent requests (else each runs alone, as it arrives). The delay is
    how long the oldest waiting request may wait for others: 0 takes whatever is queued when the
    previous call ends, so a lone request never waits."""

    enabled: bool = True
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0

    def check(self) -> list[str]:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if not self.max_queue_delay_ms >= 0:
            problems.append(f"--max-queue-delay-ms must be 0 or more, got {self.max_queue_delay_ms}")
        return problems


@dataclass
class _Pending:
    rows: Sequence[EncodedText]
    future: asyncio.Future[np.ndarray]
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self, infer: Infer, max_batch_size: int, max_queue_delay_ms: float, metrics: Metrics, lanes: int = 2
    ) -> None:
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1e3
        self.metrics = metrics
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        # Up to ``lanes`` calls in flight: while one runs, the next batch forms (and the event loop
        # answers and parses requests), so the cores do not wait for Python between calls.
        self.lanes = lanes
        self._executor = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="trimformer-infer")

    async def submit(self, rows: Sequence[EncodedText]) -> np.ndarray:
        """The model's output for ``rows`` (one row each, in order), run with whatever else is queued."""
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(self._queue))
        pending = _Pending(rows, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def _gather(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        first = await queue.get()
        taken, count = [first], len(first.rows)
        deadline = first.queued + self.max_delay
        while count < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = (
                    queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(queue.get(), remaining)
                )
            except (asyncio.QueueEmpty, TimeoutError):
                break
            taken.append(item)
            count += len(item.rows)
        return taken

    async def _loop(self, queue: asyncio.Queue[_Pending]) -> None:
        free = asyncio.Semaphore(self.lanes)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            free.release()

        while True:
            await free.acquire()
            taken = await self._gather(queue)
            task = asyncio.get_running_loop().create_task(self._run(taken))
            running.add(task)
            task.add_done_callback(finished)

    async def _run(self, taken: list[_Pending]) -> None:
        """One gathering: its texts sorted by length, cut into calls, each request answered."""
        loop = asyncio.get_running_loop()
        # (request, row) of every gathered text, shortest first.
        order = sorted(
            ((i, j) for i, item in enumerate(taken) for j in range(len(item.rows))),
            key=lambda ij: len(taken[ij[0]].rows[ij[1]]),
        )
        results: list[list[np.ndarray | None]] = [[None] * len(item.rows) for item in taken]
        started = time.perf_counter()
        for item in taken:
            self.metrics.queue_seconds.observe(started - item.queued)
        chunks = _by_length(order, lambda ij: len(taken[ij[0]].rows[ij[1]]), self.max_batch_size)
        try:
            calls = [
                loop.run_in_executor(self._executor, self._timed, [taken[i].rows[j] for i, j in chunk])
                for chunk in chunks
            ]
            for chunk, outputs in zip(chunks, await asyncio.gather(*calls), strict=True):
                for (i, j), output in zip(chunk, outputs, strict=True):
                    results[i][j] = output
        except Exception as exc:
            for item in taken:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        for item, rows_out in zip(taken, results, strict=True):
            if not item.future.done():
                item.future.set_result(np.stack(rows_out))  # type: ignore[arg-type]

    def _timed(self, rows: Sequence[EncodedText]) -> np.ndarray:
        started = time.perf_counter()
        outputs = self.infer(rows)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(rows))
        return outputs

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _by_length(
    order: list[tuple[int, int]], length: Callable[[tuple[int, int]], int], limit: int
) -> list[list[tuple[int, int]]]:
    """Rows sorted by length cut into calls of at most ``limit`` rows whose padding stays within
    :data:`PADDING_BUDGET` of their real tokens."""
    chunks: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    real = 0
    for key in order:
        size = max(1, length(key))
        if current and (
            len(current) == limit or (len(current) + 1) * size > (1 + PADDING_BUDGET) * (real + size)
        ):
            chunks.append(current)
            current, real = [], 0
        current.append(key)
        real += size
    if current:
        chunks.append(current)
    return chunks
