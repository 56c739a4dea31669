"""Turning texts into the int64 arrays a model's graph takes, in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from trimformer.data.datasets import TextDataset
from trimformer.runtime.encoding import TextEncoder

__all__ = ["Encoder", "iter_batches"]


class Encoder(TextEncoder):
    """The runtime's encoder built from a loaded tokenizer (the runtime's takes its JSON, as a
    bundle stores it): each batch padded to its longest row, or to ``pad_to`` for fixed-shape
    benchmarking."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        input_names: Sequence[str],
        max_length: int,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__(tokenizer.to_str(), input_names, max_length, pad_token_id)


def iter_batches(
    dataset: TextDataset, encoder: TextEncoder, batch_size: int, pad_to: int | None = None
) -> Iterator[tuple[dict[str, np.ndarray], slice]]:
    """Yield (feeds, row slice) over the dataset in order."""
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        pairs = None if dataset.pairs is None else dataset.pairs[start:stop]
        yield encoder(dataset.texts[start:stop], pairs, pad_to=pad_to), slice(start, stop)
