"""Running an ordered list of registered passes on an artifact, each with its default config.

Recipes give every pass its own parameters; this is the quick path for `trimformer optimize`.
Intermediate artifacts live in a scratch folder; only the last one is written to ``out``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import trimformer.passes  # noqa: F401  (importing the package registers every pass)
from trimformer.artifact import ModelArtifact
from trimformer.errors import UserError
from trimformer.formats.targets import AUTO_TARGET
from trimformer.passes.base import PASS_REGISTRY, PassConfig, apply_pass, get_pass
from trimformer.pipeline.context import DataRequest, build_pass_context, host_target
from trimformer.pipeline.stages.params import PassStageParams

__all__ = ["optimize"]

_DEFAULTS = PassStageParams()


def _default_configs(passes: list[str]) -> list[tuple[str, PassConfig]]:
    if not passes:
        raise UserError(f"no passes given; known passes: {', '.join(sorted(PASS_REGISTRY))}")
    return [(name, get_pass(name).config_cls()) for name in passes]


def optimize(
    model: str | Path,
    passes: list[str],
    out: str | Path,
    calibration: str | None = None,
    samples: int = _DEFAULTS.samples,
    overwrite: bool = False,
    seed: int = 0,
    target: str = AUTO_TARGET,
) -> tuple[ModelArtifact, list[dict[str, Any]]]:
    configs = _default_configs(passes)
    params = PassStageParams(samples=samples)
    artifact = ModelArtifact.open(model)
    request = DataRequest(
        calibration=calibration,
        samples=params.samples,
        batch_size=params.batch_size,
        pad_to=params.pad_to,
        seed=seed,
    )
    stats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trimformer-optimize-") as scratch:
        ctx = build_pass_context(artifact, request, Path(scratch), target=host_target(target))
        current = artifact
        for index, (name, config) in enumerate(configs):
            last = index == len(configs) - 1
            written = Path(out) if last else Path(scratch) / f"{index}-{name}"
            current, report = apply_pass(
                current, name, config, ctx, written, overwrite=overwrite if last else True
            )
            stats.append({"pass": name, "stats": report.stats})
    return current, stats
