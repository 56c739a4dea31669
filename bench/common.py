"""What every bench shares: sessions, feeds, predictions and interleaved latency.

Sessions come from the shipped runtime (``trimformer.runtime.session.cpu_session``: all graph
optimizations, quiet logs), so a bench times a model the way a bundle runs it; the only knob a
bench sets is the thread count. Latency is the one interleaved helper of
``trimformer.validation.latency``: warm-up, then rounds in which the order of the variants
rotates, medians over every round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from trimformer.runtime.session import Optimization, cpu_session
from trimformer.validation.latency import InterleavedLatency, time_interleaved

if TYPE_CHECKING:
    import onnx

__all__ = [
    "Batch",
    "SessionRunner",
    "feeds_for",
    "logits",
    "open_session",
    "predicted_labels",
    "time_sessions",
]

Batch = dict[str, np.ndarray]


def open_session(
    model: Path | bytes | onnx.ModelProto, threads: int | None = None, optimization: Optimization = "all"
) -> ort.InferenceSession:
    """A CPU session through the runtime's helper; ``threads`` fixed for timing (None: onnxruntime's choice)."""
    return cpu_session(model, threads=threads, optimization=optimization)


def feeds_for(session: ort.InferenceSession, batch: Batch) -> Batch:
    """The arrays of ``batch`` this session declares as inputs (plain exports lack token_type_ids)."""
    return {i.name: batch[i.name] for i in session.get_inputs()}


def logits(session: ort.InferenceSession, batches: Sequence[Batch]) -> np.ndarray:
    """The first output over every batch, concatenated in order."""
    return np.concatenate([np.asarray(session.run(None, feeds_for(session, b))[0]) for b in batches])


def predicted_labels(session: ort.InferenceSession, batches: Sequence[Batch]) -> np.ndarray:
    return logits(session, batches).argmax(-1)


def time_sessions(
    sessions: Mapping[str, ort.InferenceSession],
    batch: Batch,
    *,
    case: str,
    rounds: int,
    calls_per_round: int,
    warmup: int,
) -> InterleavedLatency:
    """Every session on the same ``batch``, in interleaved rounds; samples under ``case``."""
    calls = {
        name: {case: partial(session.run, None, feeds_for(session, batch))}
        for name, session in sessions.items()
    }
    return time_interleaved(calls, rounds=rounds, calls_per_round=calls_per_round, warmup=warmup)


class SessionRunner:
    """Any ONNX file (ours or a peer's) with a fixed thread count and the inputs it declares."""

    def __init__(self, model_path: Path, threads: int) -> None:
        self.session = open_session(model_path, threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: Batch) -> np.ndarray:
        return self.session.run([self.output_name], {n: feeds[n] for n in self.input_names})[0]
