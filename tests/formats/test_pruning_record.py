"""The pruning record schema both sides read: what is accepted, and each way a file is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from trimformer.errors import UserError
from trimformer.formats.pruning_record import (
    RECORD_FILE,
    RECORD_FORMAT,
    kept_per_layer,
    load_pruning_record,
    record_path,
    validate_record,
)


def _record(kept_heads: list[list[int]], heads: int = 4, ffn: int = 6) -> dict[str, Any]:
    layers = [
        {
            "layer": i,
            "kept_heads": kept,
            "removed_heads": [h for h in range(heads) if h not in kept],
            "kept_neurons": list(range(ffn - 1)),
            "removed_neurons": [ffn - 1],
        }
        for i, kept in enumerate(kept_heads)
    ]
    return {
        "format": RECORD_FORMAT,
        "architecture": "BertForSequenceClassification",
        "num_layers": len(layers),
        "num_heads": heads,
        "head_dim": 8,
        "hidden_size": heads * 8,
        "ffn_size": ffn,
        "importance": "magnitude",
        "layers": layers,
    }


def test_a_folder_or_the_file_itself_gives_the_same_record(tmp_path: Path) -> None:
    record = _record([[0, 2], []])
    (tmp_path / RECORD_FILE).write_text(json.dumps(record), encoding="utf-8")
    assert record_path(tmp_path) == tmp_path / RECORD_FILE
    assert load_pruning_record(tmp_path) == load_pruning_record(tmp_path / RECORD_FILE) == record


def test_a_missing_record_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape(f"no pruning record at {tmp_path / RECORD_FILE}; pass a")):
        load_pruning_record(tmp_path)


def test_a_record_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / RECORD_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_pruning_record(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(format="other/1"), "is not a trimformer-pruning-record/1 file"),
        (lambda r: r.pop("head_dim"), "lacks head_dim"),
        (lambda r: r.update(num_layers=3), "lists 2 layers, not num_layers=3"),
        (lambda r: r["layers"][1].pop("kept_heads"), "layer 1 lacks kept/removed heads or neurons"),
        (lambda r: r["layers"][0].update(removed_heads=[1]), r"layer 0 heads do not partition 0\.\.3"),
        (lambda r: r["layers"][1].update(kept_neurons=[0, 0]), r"layer 1 neurons do not partition 0\.\.5"),
    ],
)
def test_each_malformed_record_is_refused_naming_the_problem(edit: Any, message: str) -> None:
    record = _record([[0, 2], [1]])
    edit(record)
    with pytest.raises(UserError, match=message):
        validate_record(record, "r.json")


def test_a_layer_may_state_its_own_sizes() -> None:
    record = _record([[0], [0]])
    record["layers"][1].update(
        num_heads=2, removed_heads=[1], ffn_size=3, kept_neurons=[0, 2], removed_neurons=[1]
    )
    assert validate_record(record) is record


def test_kept_per_layer_counts_against_each_layers_own_sizes() -> None:
    record = _record([[0, 2, 3], [1]])
    record["layers"][1].update(
        num_heads=2, removed_heads=[0], ffn_size=3, kept_neurons=[0, 2], removed_neurons=[1]
    )
    assert kept_per_layer(validate_record(record)) == [
        {"layer": 0, "heads_kept": 3, "heads_total": 4, "ffn_kept": 5, "ffn_total": 6},
        {"layer": 1, "heads_kept": 1, "heads_total": 2, "ffn_kept": 2, "ffn_total": 3},
    ]
