"""Timing: warm-up, then repeated runs; percentiles like Olive's latency metric."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psutil

__all__ = ["LatencyStats", "PeakMemory", "summarize", "time_calls"]


@dataclass(frozen=True)
class LatencyStats:
    mean: float
    p50: float
    p90: float
    p99: float
    runs: int

    def to_dict(self) -> dict[str, float]:
        return {
            "mean": round(self.mean, 4),
            "p50": round(self.p50, 4),
            "p90": round(self.p90, 4),
            "p99": round(self.p99, 4),
        }


def summarize(samples_ms: list[float]) -> LatencyStats:
    arr = np.asarray(samples_ms, dtype=np.float64)
    return LatencyStats(
        mean=float(arr.mean()),
        p50=float(np.percentile(arr, 50)),
        p90=float(np.percentile(arr, 90)),
        p99=float(np.percentile(arr, 99)),
        runs=len(samples_ms),
    )


def time_calls(
    fn: Callable[[], object], warmup: int = 5, runs: int = 50, min_seconds: float = 1.0, max_runs: int = 2000
) -> list[float]:
    """Call ``fn`` ``warmup`` times, then at least ``runs`` times and at least ``min_seconds``.

    Returns the per-call latencies in milliseconds.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - started < min_seconds and len(samples) < max_runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


class PeakMemory:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the rise over the start."""

    def __init__(self, interval: float = 0.01) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = 0
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return round((self.peak - self.baseline) / 2**20, 1)
