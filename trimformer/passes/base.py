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
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import (
    FunctionalPass,
    InPlacePass,
    PassBase,
    PassError,
    PassResult,
    PostconditionError,
    PreconditionError,
)
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from trimformer.artifact import ModelArtifact
from trimformer.data.vocabulary import VocabularyTexts
from trimformer.errors import TrimformerError, UserError
from trimformer.formats.decoder import DecoderSpec
from trimformer.formats.targets import Target, check_graph
from trimformer.formats.tasks import ENCODER_TASKS
from trimformer.onnx_io import probe_onnxruntime

__all__ = [
    "PASS_REGISTRY",
    "CalibrationFeeds",
    "ConfigError",
    "PassConfig",
    "PassContext",
    "PassEntry",
    "PassReport",
    "SelfCheckingPass",
    "apply_pass",
    "check_emitted",
    "check_model_kind",
    "describe_error",
    "field_allowed",
    "get_pass",
    "pass_order",
    "register_pass",
    "weight_changing_passes",
]

logger = logging.getLogger(__name__)


class PassConfig(BaseModel):
    """Base for pass configs: typed, validated from the recipe, unknown keys are errors.

    Building one from keyword arguments (the CLI, the Python API) refuses a bad value with a
    one-line :class:`ConfigError` (a UserError) that also carries pydantic's errors, so that the
    recipe loader can name the file and the key.
    """

    model_config = ConfigDict(extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = [
                (".".join(map(str, e["loc"])) + ": " if e["loc"] else "") + describe_error(e, type(self))
                for e in exc.errors()
            ]
            raise ConfigError("; ".join(problems), exc) from None


class ConfigError(UserError):
    """A refused config value; ``validation`` keeps pydantic's errors for callers that name the
    key their own way (the recipe loader: file and table). pydantic calls a custom ``__init__``
    from ``model_validate`` too, so this is what both raise."""

    def __init__(self, message: str, validation: ValidationError) -> None:
        super().__init__(message)
        self.validation = validation


def field_allowed(field: FieldInfo) -> str | None:
    """What a constrained field accepts, in words: its description, else its bounds."""
    if field.description:
        return field.description
    low = _bound(field, (("ge", "["), ("gt", "(")))
    high = _bound(field, (("le", "]"), ("lt", ")")))
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{low[1]} or more" if low[0] == "[" else f"more than {low[1]}"
    if high:
        return f"at most {high[1]}" if high[0] == "]" else f"less than {high[1]}"
    return None


def _bound(field: FieldInfo, kinds: tuple[tuple[str, str], ...]) -> tuple[str, Any] | None:
    """(bracket, value) of the field's lower or upper bound (``annotated_types`` metadata)."""
    for meta in field.metadata:
        for attr, bracket in kinds:
            if getattr(meta, attr, None) is not None:
                return bracket, getattr(meta, attr)
    return None


def describe_error(error: Any, model: type[BaseModel] | None) -> str:
    """One pydantic error in words: what is allowed and what was given."""
    got = error.get("input")
    shown = "a table" if isinstance(got, dict) else repr(got)[:60]
    field = model.model_fields.get(str(error["loc"][-1])) if model is not None and error["loc"] else None
    allowed = field_allowed(field) if field is not None else None
    if error["type"] in _RANGE_ERRORS and allowed:
        return f"must be {allowed} (got {shown})"
    if error["type"] == "value_error":  # a validator's own message says what is allowed
        return str(error["ctx"]["error"])
    return f"{error['msg'][0].lower()}{error['msg'][1:]} (got {shown})"


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error"}


@dataclasses.dataclass
class PassReport(PassResult):
    """A PassResult with ``stats`` for the lineage and ``files``: what the pass produced beside
    the model (name in the artifact folder -> a path the pass keeps alive until the stage copies
    it in), so no pass writes paths into the shared context."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    # Facts later passes read from the artifact's metadata (``meta.extras``), such as the per-layer
    # head counts a pruned graph has.
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


ReferenceT = TypeVar("ReferenceT")


class SelfCheckingPass(PassBase, Generic[ReferenceT]):
    """A pass whose ``ensures()`` checks its output against what ``call()`` started from.

    ``call()`` ends with ``return self.keep_for_check(reference, report)``; ``ensures(model)``
    reads them back with :meth:`kept_for_check` and writes its figures into ``report.stats``,
    so a check's numbers land under the same report keys as when the check ran inside ``call()``.
    Calling the pass raises a check's own :class:`TrimformerError` (onnx-ir wraps what
    ``requires()``/``ensures()`` raise), so every caller gets the one-line message and exit code.
    """

    _kept: tuple[ReferenceT, PassReport] | None = None

    def __call__(self, model_or_result: ir.Model | PassResult, /) -> PassResult:
        try:
            return super().__call__(model_or_result)
        except (PreconditionError, PostconditionError) as exc:
            if isinstance(exc.__cause__, TrimformerError):
                raise exc.__cause__ from None
            raise

    def keep_for_check(self, reference: ReferenceT, report: PassReport) -> PassReport:
        self._kept = (reference, report)
        return report

    def kept_for_check(self) -> tuple[ReferenceT, PassReport]:
        if self._kept is None:
            raise PostconditionError(
                f"{type(self).__name__}.ensures() checks a result of call(); call it first"
            )
        return self._kept


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
    # The deployment target (trimformer.formats.targets): every pass's output is checked against
    # its op set before it is written, and the lineage records its name.
    target: Target | None = None
    # A causal LM's graph contract and held-out prompts (token ids), for decoder passes' token parity.
    decoder_spec: DecoderSpec | None = None
    prompts: list[list[int]] | None = None
    # A domain corpus and held-out texts with the artifact's tokenizer (vocabulary trimming).
    vocabulary: VocabularyTexts | None = None

    def require_calibration(self, pass_name: str) -> Callable[[], CalibrationFeeds]:
        if self.calibration is None:
            raise UserError(f"pass {pass_name!r} needs calibration data; pass --calibration DATA")
        return self.calibration


PassFactory = Callable[[Any, PassContext], FunctionalPass | InPlacePass]

# What a pass may need besides its input graph: calibration rows, the PyTorch source it was
# exported from, labelled rows to score candidates on, a text corpus (vocabulary trimming).
PassData = frozenset[str]
DATA_KINDS = frozenset({"calibration", "source", "eval", "corpus"})
ModelKind = Literal["encoder", "decoder"]


@dataclass(frozen=True)
class PassEntry:
    """Everything the runner knows of a pass, declared once where the pass is defined.

    ``order``: its place in a recipe's chain (lower first; None: anywhere). ``changes_weights``:
    its output no longer matches ranges trained on its input (QAT ranges are dropped after it).
    ``data``: what it reads (:data:`DATA_KINDS`); a pass without "eval" scores no candidates and
    calibrates each batch at its longest row. ``emits``: the operator domains beyond ONNX's own
    that it may write; :func:`apply_pass` refuses output in any other. ``models``: the graphs it
    knows, encoder blocks or a causal LM's KV-cache graph; :func:`apply_pass` refuses the other kind.
    """

    name: str
    config_cls: type[PassConfig]
    factory: PassFactory
    order: int | None = None
    changes_weights: bool = False
    data: PassData = frozenset({"calibration", "eval"})
    emits: frozenset[str] = frozenset()
    models: ModelKind = "encoder"


PASS_REGISTRY: dict[str, PassEntry] = {}


def register_pass(
    name: str,
    config_cls: type[PassConfig],
    *,
    order: int | None = None,
    changes_weights: bool = False,
    data: tuple[str, ...] = ("calibration", "eval"),
    emits: tuple[str, ...] = (),
    models: ModelKind = "encoder",
) -> Callable[[PassFactory], PassFactory]:
    unknown = set(data) - DATA_KINDS
    if unknown:
        raise ValueError(f"pass {name!r}: unknown data {sorted(unknown)}; known: {sorted(DATA_KINDS)}")

    def decorate(factory: PassFactory) -> PassFactory:
        PASS_REGISTRY[name] = PassEntry(
            name, config_cls, factory, order, changes_weights, frozenset(data), frozenset(emits), models
        )
        return factory

    return decorate


def get_pass(name: str) -> PassEntry:
    if name not in PASS_REGISTRY:
        raise UserError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY)) or 'none'}")
    return PASS_REGISTRY[name]


def pass_order() -> dict[str, int]:
    """The ordered passes' ranks (a recipe runs them in this order)."""
    return {name: e.order for name, e in PASS_REGISTRY.items() if e.order is not None}


def weight_changing_passes() -> frozenset[str]:
    return frozenset(name for name, e in PASS_REGISTRY.items() if e.changes_weights)


def check_emitted(entry: PassEntry, before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """A pass wrote only operator domains it declares (or that its input already had)."""
    had = {n.domain for n in before.graph.node}
    extra = {n.domain for n in after.graph.node if n.domain not in ("", "ai.onnx")} - had - entry.emits
    if extra:
        raise PassError(
            f"the {entry.name} pass wrote operators of {', '.join(sorted(extra))}, which its registry "
            "entry does not declare (emits=...); please report this"
        )


def refuse_decoder(artifact: ModelArtifact, what: str) -> None:
    """Encoder passes know encoder blocks only; a KV-cache graph gets one line, not a crash deep in
    a block finder or onnxruntime's BERT fusion."""
    if artifact.task not in ENCODER_TASKS:
        raise UserError(
            f"{what} works on encoder graphs and {artifact.path} is a {artifact.task} model "
            "with a KV cache; for a decoder use weight-only quantization (trimformer quantize --weight-only int4)"
        )


def check_model_kind(entry: PassEntry, artifact: ModelArtifact) -> None:
    """A pass gets only the kind of graph its entry says it knows."""
    if entry.models == "encoder":
        refuse_decoder(artifact, f"the {entry.name} pass")
    elif artifact.task in ENCODER_TASKS:
        raise UserError(
            f"the {entry.name} pass works on causal-LM graphs with a KV cache and {artifact.path} is a "
            f"{artifact.task} encoder; for an encoder use int8 (trimformer quantize without --weight-only)"
        )


def apply_pass(
    artifact: ModelArtifact,
    name: str,
    config: PassConfig,
    ctx: PassContext,
    out: Path,
    overwrite: bool = False,
    extra_params: dict[str, Any] | None = None,
    on_written: Callable[[Path, PassReport], None] | None = None,
    refine: Callable[[PassReport], PassReport] | None = None,
) -> tuple[ModelArtifact, PassReport]:
    """Run one registered pass on an artifact and write the result as a new artifact.

    ``refine`` may change the pass's result before it is checked and written (the prune stage's
    block reconstruction on the PyTorch source, which a pass cannot import). ``on_written`` may
    add files (records, calibration caches) to the new folder before it is renamed into place.
    """
    entry = get_pass(name)
    check_model_kind(entry, artifact)
    proto = artifact.load_model()
    # Passes run onnxruntime on their input (calibration, checks): a graph that would crash it
    # natively is caught in a child process first.
    probe_onnxruntime(artifact.model_path)
    model = ir.from_proto(proto)
    the_pass = entry.factory(config, ctx)
    try:
        result = the_pass(model)
    except (PassError, PreconditionError, PostconditionError) as exc:
        # onnx-ir wraps what requires()/ensures() raise; the user needs our one-line message.
        if isinstance(exc.__cause__, TrimformerError):
            raise exc.__cause__ from None
        raise
    report = result if isinstance(result, PassReport) else PassReport(result.model, result.modified)
    if refine is not None:
        report = refine(report)
    params = {"pass": name, **config.model_dump(mode="json"), **(extra_params or {})}
    proto_out = ir.to_proto(report.model)
    check_emitted(entry, proto, proto_out)
    if ctx.target is not None:
        check_graph(proto_out, ctx.target, f"the {name} pass")
        params["target"] = ctx.target.name
    with artifact.derive(out, step=name, params=params, overwrite=overwrite) as derived:
        derived.model = proto_out
        derived.stats = report.stats
        derived.meta.extras.update(report.extras)
        if on_written is not None:
            on_written(derived.path, report)
    return ModelArtifact.open(out), report


def iter_feeds(source: CalibrationFeeds) -> Iterator[dict[str, np.ndarray]]:
    while (feed := source.get_next()) is not None:
        yield feed
