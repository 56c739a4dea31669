"""Running an ordered list of registered passes on an artifact, each with its default config.

Recipes give every pass its own parameters; this is the quick path for `trimformer optimize`.
Intermediate artifacts live in a scratch folder; only the last one is written to ``out``.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trimformer.artifact import ModelArtifact
from trimformer.data import Encoder, load_dataset
from trimformer.data.calibration import DatasetFeeds
from trimformer.data.tokenizer import load_tokenizer
from trimformer.errors import UserError
from trimformer.passes.base import PASS_REGISTRY, CalibrationFeeds, PassContext, apply_pass, get_pass

__all__ = ["PASS_MODULES", "calibration_factory", "load_pass_modules", "optimize"]

# Modules that register passes when imported; optional ones may be absent in a partial install.
PASS_MODULES = ("fp16", "fuse", "quantize", "prune")


def load_pass_modules() -> None:
    for name in PASS_MODULES:
        try:
            importlib.import_module(f"trimformer.passes.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"trimformer.passes.{name}":
                raise


def calibration_factory(
    artifact: ModelArtifact,
    data: str,
    samples: int,
    batch_size: int = 16,
    pad_to: int | None = 128,
    seed: int = 0,
) -> Callable[[], CalibrationFeeds]:
    """A factory of fresh streaming readers over the training split of ``data``."""
    dataset = load_dataset(
        data, split="train" if data.startswith("builtin:") else "all", seed=seed, limit=samples
    )
    if len(dataset) < samples:
        raise UserError(f"calibration data {dataset.name} has {len(dataset)} rows; {samples} were asked for")
    spec = artifact.meta.tokenizer
    names = tuple(io.name for io in artifact.meta.inputs)
    encoder = Encoder(load_tokenizer(artifact.path), names, spec.max_length, spec.pad_token_id)
    return lambda: DatasetFeeds(dataset, encoder, names, samples, batch_size, pad_to)


def optimize(
    model: str | Path,
    passes: list[str],
    out: str | Path,
    calibration: str | None = None,
    samples: int = 256,
    overwrite: bool = False,
    seed: int = 0,
) -> tuple[ModelArtifact, list[dict[str, Any]]]:
    load_pass_modules()
    if not passes:
        raise UserError(f"no passes given; known passes: {', '.join(sorted(PASS_REGISTRY))}")
    configs = [(name, get_pass(name)[0]()) for name in passes]
    artifact = ModelArtifact.open(model)
    ctx = PassContext(seed=seed)
    if calibration is not None:
        ctx.calibration = calibration_factory(artifact, calibration, samples, seed=seed)
    stats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="trimformer-optimize-") as scratch:
        ctx.scratch = Path(scratch)
        current = artifact
        for index, (name, config) in enumerate(configs):
            last = index == len(configs) - 1
            target = Path(out) if last else Path(scratch) / f"{index}-{name}"
            current, report = apply_pass(
                current, name, config, ctx, target, overwrite=overwrite if last else True
            )
            stats.append({"pass": name, "stats": report.stats})
    return current, stats
