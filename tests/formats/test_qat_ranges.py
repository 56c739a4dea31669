"""The QAT ranges file both sides read: the weight digest that matches a Linear to its graph node,
and the checks on the file (the malformed cases are in tests/training/test_qat.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from trimformer.errors import UserError
from trimformer.formats.qat_ranges import QAT_RANGES_FILE, RANGES_FORMAT, read_training_ranges, weight_digest


def test_the_digest_is_of_the_shape_and_the_float32_bytes() -> None:
    weight = np.arange(6, dtype=np.float64).reshape(2, 3)
    expected = hashlib.sha256(b"(2, 3)" + weight.astype(np.float32).tobytes()).hexdigest()
    assert weight_digest(weight) == expected
    # The same values in another layout are another weight (the graph stores [in, out]).
    assert weight_digest(weight.T) != expected
    assert weight_digest(np.asfortranarray(weight)) == expected


def test_a_well_formed_file_is_returned_as_written(tmp_path: Path) -> None:
    data = {
        "format": RANGES_FORMAT,
        "linears": [{"module": "m", "quantizer": "q", "weight_sha256": "00", "lowest": -1.5, "highest": 2}],
    }
    path = tmp_path / QAT_RANGES_FILE
    path.write_text(json.dumps(data), encoding="utf-8")
    assert read_training_ranges(path) == data


@pytest.mark.parametrize(
    ("lowest", "highest", "message"),
    [(2.0, 1.0, r"m has an invalid range \[2.0, 1.0\]"), ("x", 1.0, "non-numeric range")],
)
def test_a_bad_range_is_refused(tmp_path: Path, lowest: object, highest: object, message: str) -> None:
    entry = {"module": "m", "quantizer": "q", "weight_sha256": "00", "lowest": lowest, "highest": highest}
    path = tmp_path / QAT_RANGES_FILE
    path.write_text(json.dumps({"format": RANGES_FORMAT, "linears": [entry]}), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_training_ranges(path)


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is unreadable .*distill again with --qat"):
        read_training_ranges(tmp_path / QAT_RANGES_FILE)
