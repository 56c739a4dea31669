"""Text datasets (CSV, TSV, JSONL, built-in examples) and tokenization."""

from __future__ import annotations

from trimformer.data.datasets import BUILTIN_DATASETS, SPLITS, TextDataset, load_dataset, map_labels
from trimformer.data.tokenize import Encoder, iter_batches

__all__ = [
    "BUILTIN_DATASETS",
    "SPLITS",
    "Encoder",
    "TextDataset",
    "iter_batches",
    "load_dataset",
    "map_labels",
]
