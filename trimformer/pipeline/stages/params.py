"""Each stage's data parameters, typed; their default values live in :mod:`trimformer.defaults`.

The CLI options take their defaults from these models, the recipe's ``[data]`` keys override
them only where a recipe gives a value, and the Python API gets the same defaults by building
the model without arguments. docs/RECIPES.md ("Defaults") lists them.

The quantize pass keeps its calibration row count in its own config (``QuantizeConfig.samples``,
a ``[[passes]]`` key), so its stage parameters hold only the rest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from trimformer import defaults
from trimformer.passes.base import PASS_REGISTRY, PassConfig

__all__ = [
    "CALIBRATION_SPLIT",
    "EvalSplit",
    "EvaluatingStageParams",
    "PassStageParams",
    "PruneStageParams",
    "QuantizeStageParams",
    "StageParams",
    "calibration_split",
    "eval_split",
    "stage_params_class",
]

EvalSplit = Literal["auto", "all", "train", "dev", "test"]

# The convention of validate's split = "auto": a built-in set has held-out splits (calibrate on
# train, score accuracy-aware candidates on dev, validate on test); a file is read whole (it is
# often a small set kept for that one purpose).
CALIBRATION_SPLIT = {"builtin": "train", "file": "all"}
EVAL_SPLIT = {"builtin": "dev", "file": "all"}


def _kind(spec: str) -> str:
    return "builtin" if spec.startswith("builtin:") else "file"


def calibration_split(spec: str) -> str:
    return CALIBRATION_SPLIT[_kind(spec)]


def eval_split(spec: str, split: EvalSplit) -> str:
    return EVAL_SPLIT[_kind(spec)] if split == "auto" else split


class StageParams(PassConfig):
    """How a pass stage reads its calibration data (a bad value is refused like a pass config's:
    a one-line ConfigError naming the field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(default=defaults.CALIBRATION_BATCH_SIZE, ge=1)


class PruneStageParams(StageParams):
    # Pruning calibrates each batch at its longest row (no pad_to) and scores no candidates.
    samples: int = Field(default=defaults.PRUNE_SAMPLES, ge=1)
    batch_size: int = Field(default=defaults.PRUNE_BATCH_SIZE, ge=1)


class EvaluatingStageParams(StageParams):
    pad_to: int | None = Field(default=defaults.CALIBRATION_PAD_TO, ge=1)
    # What accuracy-aware passes score their candidates on.
    eval_split: EvalSplit = "auto"
    eval_limit: int | None = Field(default=defaults.EVAL_LIMIT, ge=1)


class QuantizeStageParams(EvaluatingStageParams):
    """The calibration row count is the pass's own ``QuantizeConfig.samples``."""


class PassStageParams(EvaluatingStageParams):
    """Any other pass (``trimformer optimize``, or a recipe pass that is not prune/quantize)."""

    samples: int = Field(default=defaults.PASS_SAMPLES, ge=1)


def stage_params_class(pass_name: str) -> type[StageParams]:
    """From the pass's registry entry: a pass that calibrates but scores nothing reads each batch at
    its longest row (prune); one whose config holds its own row count (quantize) takes the rest."""
    entry = PASS_REGISTRY.get(pass_name)
    if entry is None:
        return PassStageParams
    if "calibration" in entry.data and "eval" not in entry.data:
        return PruneStageParams
    if "samples" in entry.config_cls.model_fields:
        return QuantizeStageParams
    return PassStageParams
