"""The pass interface: onnx-ir passes with a typed config, a context, and statistics.

A pass is an ``onnx_ir.passes.FunctionalPass`` or ``InPlacePass`` (``call(model) -> PassResult``,
``requires``/``ensures`` checks, ``Sequential``/``PassManager`` composition). Ours return a
:class:`PassReport`, a PassResult that also carries ``stats`` for the lineage and the report.
A pass that wraps onnxruntime's tools converts to and from ``onnx.ModelProto`` inside itself.

Passes never import torch: scores that need PyTorch gradients are computed on the torch side and
handed to the pass as data.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import (
    FunctionalPass,
    InPlacePass,
    PassError,
    PassResult,
    PostconditionError,
    PreconditionError,
)
from pydantic import BaseModel, ConfigDict

from trimformer.artifact import ModelArtifact
from trimformer.errors import TrimformerError, UserError
from trimformer.onnx_io import probe_onnxruntime

__all__ = [
    "PASS_REGISTRY",
    "CalibrationFeeds",
    "PassConfig",
    "PassContext",
    "PassReport",
    "apply_pass",
    "get_pass",
    "register_pass",
]

logger = logging.getLogger(__name__)


class PassConfig(BaseModel):
    """Base for pass configs: typed, validated from the recipe, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclasses.dataclass
class PassReport(PassResult):
    """A PassResult with ``stats`` for the lineage and ``files``: what the pass produced beside
    the model (name in the artifact folder -> a path the pass keeps alive until the stage copies
    it in), so no pass writes paths into the shared context."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)


class CalibrationFeeds(Protocol):
    """A calibration source: ``get_next()`` returns the next feed dict, or None when exhausted
    (the protocol of onnxruntime's CalibrationDataReader)."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


@dataclass
class PassContext:
    """What a pass may need, handed over lazily.

    ``calibration`` makes a fresh streaming source each call (never all samples in memory);
    ``evaluate`` scores a candidate ModelProto (higher is better) for accuracy-aware passes.
    The optional facts below come from the torch side or the artifact's metadata: a pass that
    needs one and finds None says what to pass.
    """

    calibration: Callable[[], CalibrationFeeds] | None = None
    evaluate: Callable[[onnx.ModelProto], float] | None = None
    seed: int = 0
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    progress: bool = True
    # The PyTorch source folder the artifact was exported from (for passes that need it).
    source: str | None = None
    architecture: str | None = None
    source_model_hash: str | None = None
    # Fisher scores from trimformer.training.fisher: {"heads": [...], "neurons": [...]} a layer.
    importance_scores: dict[str, list[Any]] | None = None
    # A QAT student's ranges (trimformer.formats.qat_ranges) and the file they came from.
    training_ranges: dict[str, Any] | None = None
    training_ranges_file: str | None = None

    def require_calibration(self, pass_name: str) -> Callable[[], CalibrationFeeds]:
        if self.calibration is None:
            raise UserError(f"pass {pass_name!r} needs calibration data; pass --calibration DATA")
        return self.calibration


PassFactory = Callable[[Any, PassContext], FunctionalPass | InPlacePass]
PASS_REGISTRY: dict[str, tuple[type[PassConfig], PassFactory]] = {}


def register_pass(name: str, config_cls: type[PassConfig]) -> Callable[[PassFactory], PassFactory]:
    def decorate(factory: PassFactory) -> PassFactory:
        PASS_REGISTRY[name] = (config_cls, factory)
        return factory

    return decorate


def get_pass(name: str) -> tuple[type[PassConfig], PassFactory]:
    if name not in PASS_REGISTRY:
        raise UserError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY)) or 'none'}")
    return PASS_REGISTRY[name]


def apply_pass(
    artifact: ModelArtifact,
    name: str,
    config: PassConfig,
    ctx: PassContext,
    out: Path,
    overwrite: bool = False,
    extra_params: dict[str, Any] | None = None,
    on_written: Callable[[Path, PassReport], None] | None = None,
) -> tuple[ModelArtifact, PassReport]:
    """Run one registered pass on an artifact and write the result as a new artifact.

    ``on_written`` may add files (records, calibration caches) to the new folder before it is
    renamed into place.
    """
    _, factory = get_pass(name)
    proto = artifact.load_model()
    # Passes run onnxruntime on their input (calibration, checks): a graph that would crash it
    # natively is caught in a child process first.
    probe_onnxruntime(artifact.model_path)
    model = ir.from_proto(proto)
    the_pass = factory(config, ctx)
    try:
        result = the_pass(model)
    except (PassError, PreconditionError, PostconditionError) as exc:
        # onnx-ir wraps what requires()/ensures() raise; the user needs our one-line message.
        if isinstance(exc.__cause__, TrimformerError):
            raise exc.__cause__ from None
        raise
    report = result if isinstance(result, PassReport) else PassReport(result.model, result.modified)
    params = {"pass": name, **config.model_dump(mode="json"), **(extra_params or {})}
    with artifact.derive(out, step=name, params=params, overwrite=overwrite) as derived:
        derived.model = ir.to_proto(report.model)
        derived.stats = report.stats
        if on_written is not None:
            on_written(derived.path, report)
    return ModelArtifact.open(out), report


def iter_feeds(source: CalibrationFeeds) -> Iterator[dict[str, np.ndarray]]:
    while (feed := source.get_next()) is not None:
        yield feed
