"""Streaming calibration readers: feed dicts for onnxruntime, a batch at a time.

Texts are tokenized lazily, batch by batch, so memory does not grow with the number of samples.
Batches are padded to a fixed length: calibrators that stack activations (entropy, percentile)
need one shape for every batch. A causal LM's rows are token blocks of running text instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trimformer.data.datasets import TextDataset
from trimformer.formats.decoder import DecoderSpec
from trimformer.runtime.encoding import TextEncoder

__all__ = ["DatasetFeeds", "DecoderFeeds"]


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


class DecoderFeeds:
    """A causal LM's calibration: texts framed as in training (``<s> text </s>``), concatenated and
    cut into ``block``-token rows, each fed as a prompt with an empty cache (the graph's whole input
    contract, so a quantizer can run the graph as exported). ``get_next()`` gives one row a call."""

    def __init__(
        self, texts: Sequence[str], tokenizer: Any, spec: DecoderSpec, blocks: int, block: int = 128
    ) -> None:
        self.spec = spec
        self.block = min(block, spec.context_length)
        eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
        stream: list[int] = []
        for text in texts:
            stream.extend(tokenizer.encode(text).ids)
            if eos is not None:
                stream.append(eos)
            if len(stream) >= blocks * self.block:
                break
        count = len(stream) // self.block
        self.rows = np.asarray(stream[: count * self.block], dtype=np.int64).reshape(count, self.block)
        self._cursor = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._cursor >= len(self.rows):
            return None
        ids = self.rows[self._cursor : self._cursor + 1]
        self._cursor += 1
        empty = np.zeros((1, self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=np.float32)
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
        }
        return {**feed, **dict.fromkeys(self.spec.past_names(), empty)}

    def rewind(self) -> None:
        self._cursor = 0

    def __len__(self) -> int:
        return len(self.rows)
