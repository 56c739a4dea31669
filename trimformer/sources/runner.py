"""A loaded PyTorch source run like an onnxruntime model: the reference validation compares against.

It has the shape of :class:`trimformer.validation.runners.ModelRunner` (``input_names``,
``provider``, ``run``, ``timed``) without importing validation: validation stays torch-free and
gets this runner handed in by the validate stage (:mod:`trimformer.pipeline.stages.validate`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from trimformer.sources.base import LoadedSource

__all__ = ["TorchRunner"]


class TorchRunner:
    """A PyTorch source as a reference, run under inference mode with a fixed thread count."""

    def __init__(self, source: LoadedSource, threads: int) -> None:
        self.source = source.eval()
        self.provider = "pytorch-cpu"
        self.threads = threads
        self.input_names = source.io.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        previous = torch.get_num_threads()
        # The same thread count as the onnxruntime side, so latency ratios compare like with like.
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.source.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        finally:
            torch.set_num_threads(previous)
        tensor = out if isinstance(out, torch.Tensor) else out[0]
        return tensor.float().numpy()

    def timed(self, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        return lambda: self.run(feeds)
