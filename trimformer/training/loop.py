"""The training loop that fine-tuning and distillation share.

AdamW (no weight decay on biases and norms) under a linear warm-up and linear decay, gradient
clipping, evaluation on a dev split every N steps and at the last step keeping the best weights,
a progress bar, and an optional time limit. What differs between the callers stays with them:
what one step computes (:class:`StepFn`: its micro-batches' forward and backward), how the dev
split is scored (:class:`Evaluation`), and what happens after a step (distillation's checkpoints
and stop requests, through ``after_step``).

The loop's state (:class:`LoopState`, plus the optimizer's and the schedule's) round-trips through
:meth:`TrainingLoop.checkpoint` and :meth:`TrainingLoop.restore`, so a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trimformer.progress import progress_bar

__all__ = ["Evaluation", "LoopSettings", "LoopState", "StepFn", "TrainingLoop", "adamw", "linear_schedule"]

logger = logging.getLogger(__name__)

# One optimizer step: given the step number (from 1), run the forward and backward passes of its
# micro-batches and yield each one's named loss values (for the running averages).
StepFn = Callable[[int], Iterable[dict[str, float]]]


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    lr: float
    warmup: float  # fraction of the steps spent warming the learning rate up
    weight_decay: float
    eval_every: int
    max_grad_norm: float = 1.0  # 0 turns clipping off
    # Stop (after an evaluation) once the run has lasted this long; the schedule still spans `steps`.
    time_limit: float | None = None


@dataclass
class LoopState:
    """Where a run is: the last finished step, the history of evaluations, the running losses and
    the best weights so far."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)
    best_score: float = -math.inf
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    last_score: float | None = None  # shown on the progress bar; not part of a checkpoint


@dataclass
class Evaluation:
    """How the dev split is scored (higher is better) and which weights the best score keeps."""

    score: Callable[[], float]
    weights: Callable[[], dict[str, torch.Tensor]]
    label: str  # the metric's name on the progress bar
    history_key: str = "dev"  # the score's key in each history entry
    # Whether a step's weights may be kept as the best (QAT: only fake-quantized ones).
    may_keep: Callable[[int], bool] | None = None
    note: str = ""  # appended to the progress bar's best score, e.g. the teacher's score


def linear_schedule(total: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up over ``warmup`` of the steps, then
    linear decay to zero at ``total``."""
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def adamw(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (biases, norms) do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
    )


class TrainingLoop:
    """Trains ``module``'s parameters for ``settings.steps`` steps (see the module docstring)."""

    def __init__(self, module: nn.Module, settings: LoopSettings, state: LoopState | None = None) -> None:
        self.module = module
        self.settings = settings
        self.state = state or LoopState()
        self.optimizer = adamw(module, settings.lr, settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(settings.steps, settings.warmup)
        )

    def checkpoint(self) -> dict[str, Any]:
        """The loop's part of a checkpoint (the caller adds the model and anything else)."""
        s = self.state
        return {
            "step": s.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": s.history,
            "running": s.running,
            "best_score": s.best_score,
            "best_step": s.best_step,
            "best_state": s.best_state,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = LoopState(
            step=int(payload["step"]),
            history=list(payload["history"]),
            running=dict(payload["running"]),
            best_score=float(payload["best_score"]),
            best_step=int(payload["best_step"]),
            best_state=payload["best_state"],
        )

    def run(
        self,
        step_fn: StepFn,
        evaluation: Evaluation | None,
        description: str,
        after_step: Callable[[int], None] | None = None,
        agree: Callable[[bool], bool] = bool,
        started: float | None = None,
    ) -> int:
        """Run from the step after ``state.step`` to the last; returns the last step run.

        ``after_step(step)`` runs once a step is done (it may raise to stop the run); ``agree``
        turns this process's "out of time" into the verdict of all processes (DDP ranks stop
        together); ``started`` is when the time limit started counting (default: now).
        """
        started = time.perf_counter() if started is None else started
        total = self.settings.steps
        with progress_bar(description, total) as bar:
            task_id = bar.task_ids[0]
            bar.update(task_id, completed=self.state.step)
            for step in range(self.state.step + 1, total + 1):
                for parts in step_fn(step):
                    self._track(parts)
                self._optimizer_step()
                self.state.step = step
                out_of_time = self.settings.time_limit is not None and agree(
                    time.perf_counter() - started > self.settings.time_limit
                )
                if evaluation is not None and (
                    step % self.settings.eval_every == 0 or step == total or out_of_time
                ):
                    self._evaluate(evaluation, step)
                bar.update(task_id, advance=1, info=self.describe(evaluation))
                if after_step is not None:
                    after_step(step)
                if out_of_time:
                    logger.warning(
                        "time limit of %.0f s reached at step %d of %d", self.settings.time_limit, step, total
                    )
                    return step
        return total

    def describe(self, evaluation: Evaluation | None) -> str:
        """The running losses and, once evaluated, the last and best dev scores."""
        s = self.state
        losses = "  ".join(f"{k} {v:.3f}" for k, v in s.running.items())
        if evaluation is None or s.last_score is None:
            return losses
        return (
            f"{losses}  dev {evaluation.label} {s.last_score:.4f} (best {s.best_score:.4f}{evaluation.note})"
        )

    def _track(self, parts: dict[str, float]) -> None:
        # An exponential moving average per loss, started at its first value.
        running = self.state.running
        for key, value in parts.items():
            running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value

    def _optimizer_step(self) -> None:
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _evaluate(self, evaluation: Evaluation, step: int) -> None:
        s = self.state
        score = evaluation.score()
        rounded = {k: round(v, 4) for k, v in s.running.items()}
        s.history.append({"step": step, **rounded, evaluation.history_key: round(score, 4)})
        if score > s.best_score and (evaluation.may_keep is None or evaluation.may_keep(step)):
            s.best_score, s.best_step = score, step
            s.best_state = copy.deepcopy(evaluation.weights())
        s.last_score = score
        logger.info("step %d: %s", step, self.describe(evaluation))
