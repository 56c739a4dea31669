"""Timing: warm-up, then repeated runs; percentiles like Olive's latency metric.

Two disciplines share one clock and one way of timing a call:

* :func:`time_calls` times one callable, at least ``runs`` times and at least ``min_seconds``
  (``trimformer validate``, one model at a time);
* :func:`time_interleaved` compares variants: every variant runs in every round, the order of
  the variants rotates by one each round, so drift on a shared machine (another process, a
  frequency change) hits all of them alike. The benches in ``bench/`` use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import psutil

from trimformer.errors import UserError

__all__ = [
    "Clock",
    "InterleavedLatency",
    "LatencyStats",
    "PeakMemory",
    "rotated",
    "summarize",
    "time_calls",
    "time_interleaved",
]

Clock = Callable[[], float]
"""Seconds from an arbitrary start (``time.perf_counter``; tests pass a fake one)."""


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


def _elapsed_ms(fn: Callable[[], object], clock: Clock) -> float:
    started = clock()
    fn()
    return (clock() - started) * 1000.0


def time_calls(
    fn: Callable[[], object],
    warmup: int = 5,
    runs: int = 50,
    min_seconds: float = 1.0,
    max_runs: int = 2000,
    clock: Clock = time.perf_counter,
) -> list[float]:
    """Call ``fn`` ``warmup`` times, then at least ``runs`` times and at least ``min_seconds``.

    Returns the per-call latencies in milliseconds.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = clock()
    while len(samples) < runs or (clock() - started < min_seconds and len(samples) < max_runs):
        samples.append(_elapsed_ms(fn, clock))
    return samples


@dataclass(frozen=True)
class InterleavedLatency:
    """Samples in ms, ``samples[variant][case]``, and the variant order each round ran in."""

    samples: dict[str, dict[str, list[float]]]
    orders: tuple[tuple[str, ...], ...]

    def stats(self, case: str) -> dict[str, LatencyStats]:
        return {variant: summarize(cases[case]) for variant, cases in self.samples.items()}

    def medians(self, case: str) -> dict[str, float]:
        return {variant: float(np.median(cases[case])) for variant, cases in self.samples.items()}

    def ratios(self, case: str, baseline: str) -> dict[str, float]:
        """Each variant's median over the baseline's (below 1: faster than the baseline)."""
        medians = self.medians(case)
        return {variant: median / medians[baseline] for variant, median in medians.items()}


def rotated(names: Sequence[str], round_index: int) -> tuple[str, ...]:
    """``names`` started at position ``round_index`` (mod their count) and wrapped around."""
    shift = round_index % len(names)
    return (*names[shift:], *names[:shift])


def time_interleaved(
    variants: Mapping[str, Mapping[str, Callable[[], object]]],
    *,
    rounds: int,
    calls_per_round: int | Mapping[str, int] = 20,
    warmup: int = 5,
    clock: Clock = time.perf_counter,
    after_round: Callable[[int], None] | None = None,
) -> InterleavedLatency:
    """Time ``variants[variant][case]()`` in interleaved rounds.

    Every call is first made ``warmup`` times; then in each of ``rounds`` rounds every variant,
    in an order rotated by one from the previous round, makes ``calls_per_round`` timed calls of
    each of its cases back to back (an int for every case, or one count per case name).
    ``after_round(index)`` is called after each round (progress bars).
    """
    names = list(variants)
    if not names or rounds < 1:
        raise UserError(
            f"interleaved timing got {len(names)} variants and {rounds} rounds; give at least one of each"
        )
    for cases in variants.values():
        for call in cases.values():
            for _ in range(warmup):
                call()
    samples: dict[str, dict[str, list[float]]] = {n: {c: [] for c in variants[n]} for n in names}
    orders = []
    for index in range(rounds):
        order = rotated(names, index)
        orders.append(order)
        for name in order:
            for case, call in variants[name].items():
                count = calls_per_round[case] if isinstance(calls_per_round, Mapping) else calls_per_round
                samples[name][case].extend(_elapsed_ms(call, clock) for _ in range(count))
        if after_round is not None:
            after_round(index)
    return InterleavedLatency(samples, tuple(orders))


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
