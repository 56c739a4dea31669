"""Streaming calibration readers: feed dicts for onnxruntime, a batch at a time.

Texts are tokenized lazily, batch by batch, so memory does not grow with the number of samples.
Batches are padded to a fixed length: calibrators that stack activations (entropy, percentile)
need one shape for every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trimformer.data.datasets import TextDataset
from trimformer.runtime.encoding import TextEncoder

__all__ = ["DatasetFeeds"]


class DatasetFeeds:
    """``get_next()`` yields feed dicts of ``batch_size`` rows padded to ``pad_to`` tokens."""

    def __init__(
        self,
        dataset: TextDataset,
        encoder: TextEncoder,
        input_names: Sequence[str],
        samples: int,
        batch_size: int = 16,
        pad_to: int | None = 128,
    ) -> None:
        self.dataset = dataset
        self.encoder = encoder
        self.input_names = tuple(input_names)
        self.samples = min(samples, len(dataset))
        self.batch_size = batch_size
        self.pad_to = pad_to
        self._cursor = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._cursor >= self.samples:
            return None
        start, stop = self._cursor, min(self._cursor + self.batch_size, self.samples)
        self._cursor = stop
        pairs = None if self.dataset.pairs is None else self.dataset.pairs[start:stop]
        feeds = self.encoder(self.dataset.texts[start:stop], pairs, pad_to=self.pad_to)
        return {name: feeds[name] for name in self.input_names}

    def rewind(self) -> None:
        self._cursor = 0

    def __len__(self) -> int:
        return (self.samples + self.batch_size - 1) // self.batch_size
