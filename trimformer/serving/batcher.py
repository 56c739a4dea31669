"""Dynamic batching: concurrent requests' texts gathered into onnxruntime calls, by token length.

A request hands over its encoded texts and waits. One loop takes what is queued: it starts with the
oldest request and keeps gathering for at most ``max_queue_delay_ms`` or until ``max_batch_size``
texts are waiting; then it sorts every gathered text by token length and cuts the sorted list into
calls of at most ``max_batch_size`` texts and ``max_batch_tokens`` padded tokens, so a batch pads its
rows to a length close to their own and no call needs more memory than the largest one the server
ran at start (:meth:`Batcher.warm_up`). Without batching each request's own texts are cut the same
way and run alone; so does a request that finds nothing queued and a lane free when the delay is 0
(there is nothing to gather it with). Either way at most ``lanes`` calls run at once, on worker threads: while one
runs, the next forms and the event loop answers requests; each request gets its rows back in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from trimformer.runtime.encoding import EncodedText
from trimformer.serving.metrics import Metrics

__all__ = ["LANES", "Batcher", "Batching"]

# A call pads every row to its longest; a new call starts where padding would pass this share of
# the real tokens (sorted rows, so each new row is the longest so far).
PADDING_BUDGET = 0.25
# onnxruntime calls in flight at once (docs/SERVING.md: two beat one on two cores).
LANES = 2

Infer = Callable[[Sequence[EncodedText]], np.ndarray]
T = TypeVar("T")


@dataclass(frozen=True)
class Batching:
    """``enabled``: gather concurrent requests (else each runs alone, as it arrives). The delay is
    how long the oldest waiting request may wait for others: 0 takes whatever is queued when a lane
    frees, so a lone request never waits. ``max_batch_tokens`` bounds one call's rows x padded
    length, and with it the memory a call takes."""

    enabled: bool = True
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    max_batch_tokens: int = 2048

    def check(self) -> list[str]:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if not self.max_queue_delay_ms >= 0:
            problems.append(f"--max-queue-delay-ms must be 0 or more, got {self.max_queue_delay_ms}")
        if self.max_batch_tokens < 1:
            problems.append(f"--max-batch-tokens must be at least 1, got {self.max_batch_tokens}")
        return problems

    def check_model(self, max_length: int) -> None:
        """Refuse a token budget that a single text at the model's maximum length would pass."""
        if self.max_batch_tokens < max_length:
            raise ValueError(
                f"--max-batch-tokens {self.max_batch_tokens} is below the model's maximum length "
                f"{max_length}: one text may need that many; give at least {max_length}"
            )


@dataclass
class _Pending:
    rows: Sequence[EncodedText]
    future: asyncio.Future[np.ndarray]
    queued: float = field(default_factory=time.perf_counter)
    started: bool = False


class Batcher:
    def __init__(self, infer: Infer, batching: Batching, metrics: Metrics, lanes: int = LANES) -> None:
        self.infer = infer
        self.batching = batching
        self.max_delay = batching.max_queue_delay_ms / 1e3
        self.metrics = metrics
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        # Calls in flight at once: the loop's gatherings and the requests that ran at once share them.
        self._free: asyncio.Semaphore | None = None
        self.lanes = lanes
        self._executor = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="trimformer-infer")

    def warm_up(self, longest: EncodedText) -> None:
        """Run the largest call the server can make on every lane at once, before it listens:
        onnxruntime's memory arena grows to what the service will ever need, so resident memory
        stays flat under load instead of creeping up as new shapes arrive."""
        batching = self.batching
        rows = max(1, min(batching.max_batch_size, batching.max_batch_tokens // max(1, len(longest))))
        calls = [self._executor.submit(self.infer, [longest] * rows) for _ in range(self.lanes)]
        for call in calls:
            call.result()

    async def submit(self, rows: Sequence[EncodedText]) -> np.ndarray:
        """The model's output for ``rows`` (one row each, in order), run with whatever else is
        queued, or alone when batching is off."""
        pending = _Pending(rows, asyncio.get_running_loop().create_future())
        if self._free is None:
            self._free = asyncio.Semaphore(self.lanes)
        free = self._free
        if not self.batching.enabled or (self.max_delay == 0 and self._queue_empty() and not free.locked()):
            # Nothing queued to gather with, no delay to wait for others, and a lane free: run now,
            # without the hops through the queue and the loop (about 0.3 ms on a Zen 2 core).
            async with free:
                await self._run([pending])
            return pending.future.result()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(self._queue, free))
        await self._queue.put(pending)
        return await pending.future

    def _queue_empty(self) -> bool:
        return self._queue is None or self._queue.empty()

    async def call(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on a lane (token-id requests: already a batch, run as sent)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _gather(self, queue: asyncio.Queue[_Pending], first: _Pending) -> list[_Pending]:
        taken, count = [first], len(first.rows)
        deadline = first.queued + self.max_delay
        while count < self.batching.max_batch_size:
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

    async def _loop(self, queue: asyncio.Queue[_Pending], free: asyncio.Semaphore) -> None:
        """Wait for a request, then for a lane; gather what else is queued and run it."""
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            free.release()

        while True:
            first = await queue.get()
            await free.acquire()
            taken = await self._gather(queue, first)
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
        length = lambda ij: len(taken[ij[0]].rows[ij[1]])  # noqa: E731
        chunks = by_length(order, length, self.batching.max_batch_size, self.batching.max_batch_tokens)
        try:
            calls = [
                loop.run_in_executor(
                    self._executor,
                    self._timed,
                    [taken[i].rows[j] for i, j in chunk],
                    [taken[i] for i in sorted({i for i, _ in chunk})],
                )
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

    def _timed(self, rows: Sequence[EncodedText], requests: list[_Pending]) -> np.ndarray:
        started = time.perf_counter()
        for item in requests:
            if not item.started:  # a request cut into several calls waited until its first ran
                item.started = True
                self.metrics.queue_seconds.observe(started - item.queued)
        outputs = self.infer(rows)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(rows))
        return outputs

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def by_length(
    order: list[tuple[int, int]], length: Callable[[tuple[int, int]], int], limit: int, max_tokens: int
) -> list[list[tuple[int, int]]]:
    """Rows sorted by length cut into calls of at most ``limit`` rows and ``max_tokens`` padded
    tokens whose padding stays within :data:`PADDING_BUDGET` of their real tokens."""
    chunks: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    real = 0
    for key in order:
        size = max(1, length(key))
        padded = (len(current) + 1) * size
        if current and (
            len(current) == limit or padded > max_tokens or padded > (1 + PADDING_BUDGET) * (real + size)
        ):
            chunks.append(current)
            current, real = [], 0
        current.append(key)
        real += size
    if current:
        chunks.append(current)
    return chunks
