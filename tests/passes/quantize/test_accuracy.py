"""The accuracy-aware search: fewest nodes back in float, in about 2 log2(n) evaluations."""

from __future__ import annotations

from collections.abc import Callable

import onnx
import pytest

from trimformer.passes.quantize.accuracy import Attempt, fewest_float_nodes


def _attempts(needed: int) -> tuple[list[int], Callable[[int], Attempt]]:
    """An attempt whose drop fits the 1-point budget once ``needed`` nodes are float."""
    tried: list[int] = []

    def attempt(k: int) -> Attempt:
        tried.append(k)
        return Attempt(k, onnx.ModelProto(), 0.5 if k >= needed else 3.0)

    return tried, attempt


@pytest.mark.parametrize("needed", [1, 2, 3, 5, 17, 40, 64])
def test_finds_the_fewest_float_nodes(needed: int) -> None:
    tried, attempt = _attempts(needed)
    best = fewest_float_nodes(64, attempt, budget=1.0)
    assert best.float_nodes == needed and best.drop <= 1.0
    assert len(tried) <= 2 * 6 + 1  # doubling then bisection over 64 nodes


def test_returns_the_all_float_attempt_when_nothing_fits() -> None:
    tried, attempt = _attempts(needed=1000)
    best = fewest_float_nodes(10, attempt, budget=1.0)
    assert best.float_nodes == 10 and best.drop > 1.0
    assert tried == [1, 2, 4, 8, 10]
