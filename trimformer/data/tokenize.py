"""Turning texts into the int64 arrays a model's graph takes, in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from trimformer.data.datasets import TextDataset

__all__ = ["Encoder", "iter_batches"]


class Encoder:
    """Encodes texts for a given set of graph inputs, padding each batch to its longest row
    (or to ``pad_to`` for fixed-shape benchmarking)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        input_names: Sequence[str],
        max_length: int,
        pad_token_id: int = 0,
    ) -> None:
        self.input_names = tuple(input_names)
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        self._tok.enable_truncation(max_length=max_length)
        self._tok.no_padding()

    def __call__(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, pad_to: int | None = None
    ) -> dict[str, np.ndarray]:
        if pairs is not None:
            encodings = self._tok.encode_batch(list(zip(texts, pairs, strict=True)))
        else:
            encodings = self._tok.encode_batch(list(texts))
        width = pad_to or max((len(e.ids) for e in encodings), default=1)
        width = max(width, 1)
        ids = np.full((len(encodings), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = min(len(enc.ids), width)
            ids[row, :n] = enc.ids[:n]
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids[:n]
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.input_names}


def iter_batches(
    dataset: TextDataset, encoder: Encoder, batch_size: int, pad_to: int | None = None
) -> Iterator[tuple[dict[str, np.ndarray], slice]]:
    """Yield (feeds, row slice) over the dataset in order."""
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        pairs = None if dataset.pairs is None else dataset.pairs[start:stop]
        yield encoder(dataset.texts[start:stop], pairs, pad_to=pad_to), slice(start, stop)
