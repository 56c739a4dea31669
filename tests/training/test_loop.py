"""The shared training loop: schedule, best-weights keeping, resuming from a checkpoint, time limit."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

from trimformer.progress import set_progress_enabled
from trimformer.training.loop import Evaluation, LoopSettings, StepFn, TrainingLoop, linear_schedule

set_progress_enabled(False)


def _regression(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(4, 1), torch.randn(32, 4), torch.randn(32, 1)


def _step(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> StepFn:
    def step(number: int) -> list[dict[str, float]]:
        rows = slice((number * 8) % 32, (number * 8) % 32 + 8)
        loss = nn.functional.mse_loss(model(x[rows]), y[rows])
        loss.backward()
        return [{"mse": loss.item()}]

    return step


def _evaluation(
    model: nn.Linear, x: torch.Tensor, y: torch.Tensor, may_keep: Callable[[int], bool] | None = None
) -> Evaluation:
    def score() -> float:
        with torch.no_grad():
            return -float(nn.functional.mse_loss(model(x), y))

    return Evaluation(score=score, weights=model.state_dict, label="neg_mse", may_keep=may_keep)


SETTINGS = LoopSettings(steps=12, lr=0.05, warmup=0.25, weight_decay=0.01, eval_every=4)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    factor = linear_schedule(10, 0.2)
    assert [factor(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_evaluates_on_schedule_and_keeps_the_best_allowed_weights() -> None:
    model, x, y = _regression()
    loop = TrainingLoop(model, SETTINGS)
    assert loop.run(_step(model, x, y), _evaluation(model, x, y, may_keep=lambda s: s != 12), "t") == 12
    state = loop.state
    assert [h["step"] for h in state.history] == [4, 8, 12] and set(state.history[0]) == {
        "step",
        "mse",
        "dev",
    }
    allowed = [h for h in state.history if h["step"] != 12]
    assert state.best_step == max(allowed, key=lambda h: h["dev"])["step"]
    assert state.best_state is not None and not torch.equal(state.best_state["weight"], model.weight)


def test_a_restored_checkpoint_continues_exactly() -> None:
    model, x, y = _regression()
    reference = TrainingLoop(model, SETTINGS)
    reference.run(_step(model, x, y), _evaluation(model, x, y), "t")

    first, x, y = _regression()
    stopped = TrainingLoop(first, SETTINGS)

    def interrupt(step: int) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stopped.run(_step(first, x, y), _evaluation(first, x, y), "t", after_step=interrupt)
    payload = copy.deepcopy({**stopped.checkpoint(), "model": first.state_dict()})
    second = nn.Linear(4, 1)
    second.load_state_dict(payload["model"])
    resumed = TrainingLoop(second, SETTINGS)
    resumed.restore(payload)
    resumed.run(_step(second, x, y), _evaluation(second, x, y), "t")
    assert torch.equal(second.weight, model.weight) and resumed.state.history == reference.state.history


def test_time_limit_stops_after_an_evaluation() -> None:
    model, x, y = _regression()
    loop = TrainingLoop(model, dataclasses.replace(SETTINGS, time_limit=1e-9))
    assert loop.run(_step(model, x, y), _evaluation(model, x, y), "t") == 1
    assert [h["step"] for h in loop.state.history] == [1] and loop.state.best_step == 1
