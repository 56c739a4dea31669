"""Side-by-side measurement of model variants in one process: accuracy, fidelity, latency.

Variants are timed in interleaved rounds (every variant once per round, in a rotating order),
so drift on a shared machine hits all of them alike; figures are p50/p90 over all rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from trimformer.data import Encoder, TextDataset
from trimformer.progress import progress_bar

__all__ = ["Measured", "SessionRunner", "interleaved_latency", "predict_all"]

logger = logging.getLogger(__name__)


class SessionRunner:
    """Any ONNX file (ours or a peer's) with a fixed thread count and the inputs it declares."""

    def __init__(self, model_path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {n: feeds[n] for n in self.input_names})[0]


@dataclass
class Measured:
    logits: np.ndarray | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)


def predict_all(
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    encoder: Encoder,
    data: TextDataset,
    batch_size: int = 64,
) -> np.ndarray:
    out = []
    for start in range(0, len(data), batch_size):
        out.append(np.asarray(run(encoder(data.texts[start : start + batch_size])), dtype=np.float32))
    return np.concatenate(out)


def interleaved_latency(
    runners: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]],
    shapes: dict[str, list[dict[str, np.ndarray]]],
    rounds: int,
    calls_per_round: dict[str, int],
    warmup: int = 5,
) -> dict[str, dict[str, list[float]]]:
    """Latency samples in ms: result[variant][shape] over ``rounds`` rotating rounds.

    ``shapes[name]`` is a list of feed dicts cycled through (one for padded shapes, many real
    texts for natural length).
    """
    names = list(runners)
    samples: dict[str, dict[str, list[float]]] = {n: {s: [] for s in shapes} for n in names}
    for name in names:
        for feeds_list in shapes.values():
            for i in range(warmup):
                runners[name](feeds_list[i % len(feeds_list)])
    total = rounds * len(names)
    with progress_bar("latency rounds", total) as bar:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                for shape, feeds_list in shapes.items():
                    for i in range(calls_per_round[shape]):
                        feeds = feeds_list[(r * calls_per_round[shape] + i) % len(feeds_list)]
                        t0 = time.perf_counter()
                        runners[name](feeds)
                        samples[name][shape].append((time.perf_counter() - t0) * 1000.0)
                bar.update(bar.task_ids[0], advance=1)
    return samples
