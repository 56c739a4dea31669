"""The benches' one latency helper: rotation order, warm-up, medians and ratios, on a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from bench.common import feeds_for, time_sessions
from trimformer.errors import UserError
from trimformer.validation.latency import rotated, time_calls, time_interleaved


class FakeClock:
    """A clock that only moves when a fake call runs, by that call's next duration."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, seconds: list[float]) -> Callable[[], None]:
        turn = iter(seconds * 1000)

        def run() -> None:
            self.log.append(name)
            self.now += next(turn)

        return run


def test_rotated_starts_one_later_each_round_and_wraps() -> None:
    names = ["a", "b", "c"]
    assert [rotated(names, r) for r in range(4)] == [
        ("a", "b", "c"),
        ("b", "c", "a"),
        ("c", "a", "b"),
        ("a", "b", "c"),
    ]


def test_variants_warm_up_then_run_in_rotating_order() -> None:
    clock = FakeClock()
    variants = {name: {"1x128": clock.call(name, [0.001])} for name in ("a", "b", "c")}
    times = time_interleaved(variants, rounds=4, calls_per_round=2, warmup=1, clock=clock)
    warm_up, timed = clock.log[:3], clock.log[3:]
    assert warm_up == ["a", "b", "c"]
    # Each round: every variant once, its calls back to back, the order rotated by one.
    rotations = [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c")]
    assert timed == [name for order in rotations for name in order for _ in range(2)]
    assert times.orders == tuple(rotations)
    assert {name: len(cases["1x128"]) for name, cases in times.samples.items()} == {"a": 8, "b": 8, "c": 8}


def test_medians_and_ratios_come_from_the_timed_calls_only() -> None:
    clock = FakeClock()
    variants = {
        # The 1 s warm-up call of "base" must not reach its samples.
        "base": {"1x128": clock.call("base", [1.0, 0.004, 0.002, 0.009])},
        "fast": {"1x128": clock.call("fast", [0.001])},
    }
    times = time_interleaved(variants, rounds=1, calls_per_round=3, warmup=1, clock=clock)
    np.testing.assert_allclose(times.samples["base"]["1x128"], [4.0, 2.0, 9.0])
    assert times.medians("1x128") == pytest.approx({"base": 4.0, "fast": 1.0})
    assert times.ratios("1x128", "base") == pytest.approx({"base": 1.0, "fast": 0.25})
    stats = times.stats("1x128")
    assert stats["base"].p50 == pytest.approx(4.0) and stats["base"].runs == 3
    assert stats["base"].mean == pytest.approx(5.0)


def test_calls_per_round_can_differ_per_case() -> None:
    clock = FakeClock()
    variants = {
        name: {"1x128": clock.call(f"{name}:1", [0.001]), "32x128": clock.call(f"{name}:32", [0.01])}
        for name in ("a", "b")
    }
    times = time_interleaved(
        variants, rounds=2, calls_per_round={"1x128": 3, "32x128": 1}, warmup=0, clock=clock
    )
    one_round = {name: [f"{name}:1"] * 3 + [f"{name}:32"] for name in ("a", "b")}
    assert clock.log == one_round["a"] + one_round["b"] + one_round["b"] + one_round["a"]
    assert len(times.samples["a"]["1x128"]) == 6 and len(times.samples["a"]["32x128"]) == 2
    assert times.medians("32x128") == pytest.approx({"a": 10.0, "b": 10.0})


def test_no_rounds_is_refused_with_one_line() -> None:
    with pytest.raises(UserError, match="0 rounds; give at least one of each"):
        time_interleaved({"a": {"x": lambda: None}}, rounds=0)


def test_time_calls_runs_at_least_runs_and_at_least_min_seconds() -> None:
    clock = FakeClock()
    samples = time_calls(clock.call("m", [0.25]), warmup=2, runs=3, min_seconds=0.0, clock=clock)
    assert samples == pytest.approx([250.0] * 3) and len(clock.log) == 5
    clock = FakeClock()
    # 0.25 s a call: the clock passes 1 s after the fourth timed call.
    samples = time_calls(clock.call("m", [0.25]), warmup=0, runs=1, min_seconds=1.0, clock=clock)
    assert len(samples) == 4


class FakeSession:
    """An onnxruntime session's surface: declared inputs, and run() recording the feeds it got."""

    def __init__(self, inputs: tuple[str, ...]) -> None:
        self.inputs = inputs
        self.feeds: list[set[str]] = []

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self.inputs]

    def run(self, outputs: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append(set(feeds))
        return [np.zeros((1, 3), dtype=np.float32)]


def test_time_sessions_feeds_each_session_the_inputs_it_declares() -> None:
    batch = {
        name: np.ones((1, 4), dtype=np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    bert = FakeSession(("input_ids", "attention_mask", "token_type_ids"))
    plain = FakeSession(("input_ids", "attention_mask"))
    assert set(feeds_for(plain, batch)) == {"input_ids", "attention_mask"}  # type: ignore[arg-type]
    times = time_sessions(
        {"bert": bert, "plain": plain},  # type: ignore[dict-item]
        batch,
        case="1x4",
        rounds=3,
        calls_per_round=2,
        warmup=1,
    )
    assert len(bert.feeds) == len(plain.feeds) == 1 + 3 * 2
    assert plain.feeds[-1] == {"input_ids", "attention_mask"} and len(bert.feeds[-1]) == 3
    assert times.orders == (("bert", "plain"), ("plain", "bert"), ("bert", "plain"))
    assert set(times.samples["plain"]) == {"1x4"} and len(times.samples["plain"]["1x4"]) == 6
