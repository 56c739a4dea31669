"""The one builder of a pass's context, for the stage commands and the recipe alike.

A stage says what data it reads in a :class:`DataRequest` (which files, which columns, its
:mod:`~trimformer.pipeline.stages.params`); :func:`build_pass_context` turns it into a
:class:`~trimformer.passes.base.PassContext`: a factory of fresh streaming calibration readers,
an ``evaluate`` that scores a candidate graph's accuracy (the eval rows are tokenized once), and
the artifact's facts (architecture, source hash, the PyTorch source folder). The facts that need
more than the artifact (Fisher scores, QAT ranges) are added by :func:`add_fisher_scores` and
:func:`add_training_ranges`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tokenizers import Tokenizer

from trimformer.artifact import ModelArtifact
from trimformer.data import TextDataset, load_dataset, map_labels
from trimformer.data.calibration import DatasetFeeds, DecoderFeeds
from trimformer.data.prompts import PARITY_PROMPTS, held_out_prompts
from trimformer.data.tokenize import iter_batches
from trimformer.errors import UserError
from trimformer.formats.decoder import DecoderSpec
from trimformer.formats.qat_ranges import QAT_RANGES_FILE, read_training_ranges
from trimformer.formats.targets import AUTO_TARGET, Target, resolve_target
from trimformer.passes.base import CalibrationFeeds, PassContext, refuse_decoder
from trimformer.pipeline.stages.params import EvalSplit, PassStageParams, calibration_split, eval_split
from trimformer.runtime.cpu import cpu_class, cpu_name
from trimformer.runtime.encoding import TextEncoder
from trimformer.runtime.session import cpu_session
from trimformer.validation.reference import artifact_encoder

logger = logging.getLogger(__name__)

__all__ = [
    "ColumnOptions",
    "Columns",
    "DataRequest",
    "StageOptions",
    "add_fisher_scores",
    "add_training_ranges",
    "build_decoder_context",
    "build_pass_context",
    "host_target",
    "is_classifier",
    "load_calibration",
    "onnx_accuracy_fn",
]

EVAL_BATCH = 64


@dataclass(frozen=True)
class Columns:
    """Which columns of a dataset hold the text, the second text and the label (None: defaults)."""

    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None

    def kwargs(self) -> dict[str, str | None]:
        return {
            "text_column": self.text_column,
            "text_pair_column": self.text_pair_column,
            "label_column": self.label_column,
        }


@dataclass(kw_only=True)
class ColumnOptions:
    """The column options of every stage that reads a dataset (a base of its config)."""

    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None

    def columns(self) -> Columns:
        return Columns(self.text_column, self.text_pair_column, self.label_column)


@dataclass(kw_only=True)
class StageOptions(ColumnOptions):
    """What every artifact stage that reads data takes (a base of its config)."""

    model: str
    out: str
    calibration: str | None = None
    overwrite: bool = False
    # The deployment target (trimformer.formats.targets); "auto": this CPU's.
    target: str = AUTO_TARGET


@dataclass(frozen=True)
class DataRequest:
    """What data a pass stage reads, however it was started."""

    calibration: str | None = None
    evaluate: str | None = None
    # The stage's parameters (trimformer.pipeline.stages.params holds their defaults).
    samples: int = PassStageParams().samples
    batch_size: int = PassStageParams().batch_size
    pad_to: int | None = None
    eval_split: EvalSplit = "auto"
    eval_limit: int | None = PassStageParams().eval_limit
    columns: Columns = field(default_factory=Columns)
    seed: int = 0
    # Refuse calibration data with fewer rows than ``samples`` (a quantizer calibrated on fewer
    # rows than asked for is a silent change); pruning takes what there is.
    exact_rows: bool = True
    # A recipe offers evaluation to every pass: skip it quietly when the model or the data
    # cannot score accuracy, instead of refusing as an explicit --eval does.
    evaluate_optional: bool = False
    # Batches of similar length waste little on padding (a fixed order, so runs repeat exactly).
    sort_by_length: bool = False


def is_classifier(artifact: ModelArtifact) -> bool:
    return artifact.meta.task == "sequence-classification" and bool(artifact.labels)


def load_calibration(artifact: ModelArtifact, request: DataRequest) -> TextDataset | None:
    """The calibration rows of ``request`` (checked against the model), or None without data."""
    spec = request.calibration
    if spec is None:
        return None
    dataset = load_dataset(
        spec,
        split=calibration_split(spec),
        seed=request.seed,
        limit=request.samples,
        **request.columns.kwargs(),
    )
    if request.exact_rows and len(dataset) < request.samples:
        raise UserError(
            f"calibration data {spec} has {len(dataset)} rows but {request.samples} were asked for; "
            f"pass more data or --samples {len(dataset)}"
        )
    input_names = [io.name for io in artifact.meta.inputs]
    if dataset.pairs is not None and "token_type_ids" not in input_names:
        raise UserError(
            f"calibration data has sentence pairs but the model takes only {', '.join(input_names)}; "
            "drop --text-pair-column"
        )
    if request.sort_by_length:
        dataset = dataset.take(sorted(range(len(dataset)), key=lambda i: len(dataset.texts[i])))
    return dataset


def _calibration_factory(
    artifact: ModelArtifact, encoder: TextEncoder, dataset: TextDataset, request: DataRequest
) -> Callable[[], CalibrationFeeds]:
    max_length = artifact.meta.tokenizer.max_length
    pad_to = None if request.pad_to is None else min(request.pad_to, max_length)
    names = list(encoder.input_names)
    samples, batch = request.samples, request.batch_size
    return lambda: DatasetFeeds(dataset, encoder, names, samples, batch, pad_to)


def onnx_accuracy_fn(
    encoder: TextEncoder, dataset: Any, targets: np.ndarray
) -> Callable[[onnx.ModelProto], float]:
    """An ``evaluate(model_proto) -> accuracy`` for accuracy-aware passes; the data is encoded once."""
    batches = [(feeds, targets[rows]) for feeds, rows in iter_batches(dataset, encoder, EVAL_BATCH)]

    def evaluate(model: onnx.ModelProto) -> float:
        session = cpu_session(model)
        names = [i.name for i in session.get_inputs()]
        correct = 0
        for feeds, labels in batches:
            logits = session.run(None, {n: feeds[n] for n in names})[0]
            correct += int((np.asarray(logits).argmax(-1) == labels).sum())
        return correct / len(dataset)

    return evaluate


def _evaluator(
    artifact: ModelArtifact, encoder: TextEncoder, request: DataRequest
) -> Callable[[onnx.ModelProto], float] | None:
    spec = request.evaluate
    if spec is None:
        return None
    if not is_classifier(artifact):
        if request.evaluate_optional:
            return None
        raise UserError("--max-accuracy-drop needs a classification model with labels; this one has none")
    dataset = load_dataset(
        spec,
        split=eval_split(spec, request.eval_split),
        seed=request.seed,
        limit=request.eval_limit,
        **request.columns.kwargs(),
    )
    if dataset.labels is None or len(dataset) == 0:
        if request.evaluate_optional:
            return None
        raise UserError(f"evaluation data {spec} has no labels; pass a labelled dataset with --eval")
    assert artifact.labels is not None
    return onnx_accuracy_fn(encoder, dataset, map_labels(dataset.labels, artifact.labels))


def host_target(name: str = AUTO_TARGET) -> Target:
    """The target ``name`` stands for here; ``auto`` is this CPU's, and says which it chose."""
    target = resolve_target(name, cpu_class())
    if name == AUTO_TARGET:
        logger.info("target auto: %s (this CPU: %s, %s)", target.name, cpu_name(), cpu_class())
    return target


def build_pass_context(
    artifact: ModelArtifact,
    request: DataRequest,
    scratch: Path,
    source: str | Path | None = None,
    calibration_set: TextDataset | None = None,
    target: Target | None = None,
) -> PassContext:
    """A PassContext for a pass on ``artifact``; ``calibration_set`` reuses rows already read;
    ``target`` defaults to this CPU's."""
    refuse_decoder(artifact, "trimformer's prune, quantize and fuse passes")
    ctx = PassContext(
        target=target or host_target(),
        seed=request.seed,
        scratch=scratch,
        source=None if source is None else str(source),
        architecture=artifact.meta.architecture,
        source_model_hash=artifact.meta.source_hash or artifact.model_hash(),
    )
    if request.calibration is None and request.evaluate is None:
        return ctx
    encoder = artifact_encoder(artifact)
    dataset = calibration_set if calibration_set is not None else load_calibration(artifact, request)
    if dataset is not None:
        ctx.calibration = _calibration_factory(artifact, encoder, dataset, request)
    ctx.evaluate = _evaluator(artifact, encoder, request)
    return ctx


def build_decoder_context(
    artifact: ModelArtifact,
    calibration: str | None,
    prompts: str | None,
    blocks: int,
    new_tokens: int,
    scratch: Path,
    target: Target | None = None,
    seed: int = 0,
) -> PassContext:
    """A decoder pass's context: the graph contract, held-out prompts for token parity (the test
    split's first halves of ``prompts``, else the built-in prompts, as the export's parity uses;
    each leaves room for ``new_tokens`` in the context) and, with ``calibration``, its train split
    as ``blocks`` token blocks of running text."""
    spec = DecoderSpec.from_extras(artifact.meta.extras, str(artifact.path))
    tokenizer = Tokenizer.from_file(str(artifact.path / artifact.meta.tokenizer.file))
    tokenizer.no_truncation()
    ctx = PassContext(
        target=target or host_target(),
        seed=seed,
        scratch=scratch,
        architecture=artifact.meta.architecture,
        source_model_hash=artifact.meta.source_hash or artifact.model_hash(),
        decoder_spec=spec,
        prompts=held_out_prompts(tokenizer, spec.context_length, prompts, len(PARITY_PROMPTS), new_tokens),
    )
    if calibration is not None:
        texts = load_dataset(calibration, split=calibration_split(calibration), seed=seed).texts
        ctx.calibration = lambda: DecoderFeeds(texts, tokenizer, spec, blocks)
    return ctx


def add_training_ranges(ctx: PassContext, artifact: ModelArtifact, model: str) -> None:
    """Hand the pass the activation ranges a QAT student was trained with."""
    path = artifact.path / QAT_RANGES_FILE
    if not path.is_file():
        raise UserError(
            f"{model} was not trained with QAT (no {QAT_RANGES_FILE}); distill with --qat and export "
            "again, or quantize with --calibration DATA"
        )
    ctx.training_ranges, ctx.training_ranges_file = read_training_ranges(path), str(path)


def add_fisher_scores(
    ctx: PassContext, source: Any, dataset: TextDataset, samples: int, batch_size: int, max_length: int
) -> None:
    """Fisher scores of every head and neuron, from gradients of the PyTorch ``source``."""
    # torch is imported only when a stage computes scores (the ONNX-only commands never do).
    from trimformer.training.fisher import fisher_scores

    ctx.importance_scores = fisher_scores(
        source, dataset, samples=samples, batch_size=batch_size, max_length=max_length
    )
