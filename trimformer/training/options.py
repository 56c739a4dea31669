"""The options fine-tuning and distillation share, checked once for both.

Each command keeps its own options (and defaults) in its config dataclass
(:class:`~trimformer.training.finetune.TrainConfig`,
:class:`~trimformer.training.distill.api.DistillConfig`); the rules and messages for the ones they
share live here, so ``trimformer train`` and ``trimformer distill`` refuse a bad value the same way
and read their data's columns the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Union

from trimformer.errors import UserError
from trimformer.training.loop import LoopSettings

if TYPE_CHECKING:  # the configs import this module
    from trimformer.training.distill.api import DistillConfig
    from trimformer.training.finetune import TrainConfig

__all__ = ["Check", "SharedOptions", "data_columns", "loop_settings", "refuse_failed", "schedule_checks"]

Check = tuple[bool, str]  # (the value is fine, the message that refuses it otherwise)


# Either config: both have the options read here.
SharedOptions = Union["TrainConfig", "DistillConfig"]


def schedule_checks(options: SharedOptions) -> list[Check]:
    o = options
    return [
        (o.steps is None or o.steps >= 1, f"--steps must be at least 1, got {o.steps}"),
        (o.batch_size >= 1, f"--batch-size must be at least 1, got {o.batch_size}"),
        (8 <= o.max_length <= 512, f"--max-length must be between 8 and 512, got {o.max_length}"),
        (0 < o.lr < 1, f"--lr must be in (0, 1), got {o.lr}"),
        (0 <= o.warmup < 1, f"--warmup must be a fraction in [0, 1), got {o.warmup}"),
        (o.eval_every >= 1, f"--eval-every must be at least 1, got {o.eval_every}"),
    ]


def refuse_failed(checks: Iterable[Check]) -> None:
    """Raise the first failed check's message as a UserError."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def data_columns(options: SharedOptions) -> dict[str, Any]:
    """The column options ``load_dataset`` takes (None: found by name)."""
    return {
        "text_column": options.text_column,
        "text_pair_column": options.text_pair_column,
        "label_column": options.label_column,
    }


def loop_settings(options: SharedOptions, steps: int, time_limit: float | None = None) -> LoopSettings:
    """The training loop's settings from a config (``steps`` as the command counts them)."""
    return LoopSettings(
        steps=steps,
        lr=options.lr,
        warmup=options.warmup,
        weight_decay=options.weight_decay,
        eval_every=options.eval_every,
        time_limit=time_limit,
    )
