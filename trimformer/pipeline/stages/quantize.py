"""The fuse and quantize stages: artifact in, fused or int8 artifact out.

Glue between the CLI (or a recipe) and the passes: opens the artifact, checks the data before
anything runs, builds a PassContext whose calibration factory streams a dataset through
:class:`DatasetFeeds` and whose ``evaluate`` scores a candidate graph's accuracy, calls
``apply_pass``, and writes the calibration ranges and a ``quantization_report.json`` next to the
new model. Nothing is written when a check or the accuracy gate fails.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trimformer.artifact import ModelArtifact
from trimformer.data import Encoder, load_dataset, map_labels
from trimformer.data.calibration import DatasetFeeds
from trimformer.data.tokenizer import load_tokenizer
from trimformer.errors import UserError
from trimformer.fsutil import check_output_dir
from trimformer.passes.base import PassContext, PassReport, apply_pass
from trimformer.passes.fuse.fusion import FuseConfig
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.passes.quantize.training_ranges import QAT_RANGES_FILE, read_training_ranges

__all__ = ["REPORT_FILE", "QuantizeStageConfig", "attention_dims", "run_fuse", "run_quantize"]

logger = logging.getLogger(__name__)

REPORT_FILE = "quantization_report.json"


@dataclass
class QuantizeStageConfig:
    model: str
    out: str
    quantize: QuantizeConfig
    calibration: str | None = None
    eval: str | None = None
    batch_size: int = 16
    # None: each batch at its longest row (fast); calibration batches may have any shape here.
    pad_to: int | None = None
    eval_limit: int | None = 1000
    overwrite: bool = False
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    seed: int = 0


def attention_dims(artifact: ModelArtifact) -> tuple[int, int]:
    """(num_heads, hidden_size) from the artifact's config.json or pruning record; 0 = unknown."""
    if artifact.meta.extras.get("pruning") is not None:
        # Pruned layers keep different head counts; the fuse pass reads them from the graph.
        return 0, 0
    config = artifact.path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        n_heads = data.get("num_attention_heads") or data.get("n_heads") or 0
        hidden = data.get("hidden_size") or data.get("dim") or 0
        return int(n_heads), int(hidden)
    return 0, 0


def _split(spec: str) -> str:
    # Built-in sets have held-out splits: calibrate on train, never on what is evaluated.
    return "train" if spec.startswith("builtin:") else "all"


def _columns(config: QuantizeStageConfig) -> dict[str, Any]:
    return {
        "text_column": config.text_column,
        "text_pair_column": config.text_pair_column,
        "label_column": config.label_column,
    }


def _evaluate_fn(artifact: ModelArtifact, encoder: Encoder, config: QuantizeStageConfig) -> Any:
    if artifact.meta.task != "sequence-classification" or not artifact.labels:
        raise UserError("--max-accuracy-drop needs a classification model with labels; this one has none")
    assert config.eval is not None
    split = "dev" if config.eval.startswith("builtin:") else "all"
    dataset = load_dataset(
        config.eval, split=split, seed=config.seed, limit=config.eval_limit, **_columns(config)
    )
    if dataset.labels is None or len(dataset) == 0:
        raise UserError(f"evaluation data {config.eval} has no labels; pass a labelled dataset with --eval")
    return onnx_accuracy_fn(encoder, dataset, map_labels(dataset.labels, artifact.labels))


def onnx_accuracy_fn(encoder: Encoder, dataset: Any, targets: np.ndarray) -> Any:
    """An ``evaluate(model_proto) -> accuracy`` for accuracy-aware passes; the data is encoded once."""
    batches = []
    for start in range(0, len(dataset), 64):
        pairs = None if dataset.pairs is None else dataset.pairs[start : start + 64]
        batches.append((encoder(dataset.texts[start : start + 64], pairs), targets[start : start + 64]))

    def evaluate(model: onnx.ModelProto) -> float:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        correct = 0
        for feeds, labels in batches:
            logits = session.run(None, {n: feeds[n] for n in names})[0]
            correct += int((np.asarray(logits).argmax(-1) == labels).sum())
        return correct / len(dataset)

    return evaluate


def _context(artifact: ModelArtifact, config: QuantizeStageConfig, scratch: Path) -> PassContext:
    qcfg = config.quantize
    ctx = PassContext(seed=config.seed, scratch=scratch)
    input_names = [spec.name for spec in artifact.meta.inputs]
    tok = artifact.meta.tokenizer
    encoder = Encoder(load_tokenizer(artifact.path), input_names, tok.max_length, tok.pad_token_id)
    if config.calibration is not None:
        dataset = load_dataset(
            config.calibration,
            split=_split(config.calibration),
            seed=config.seed,
            limit=qcfg.samples,
            **_columns(config),
        )
        if len(dataset) < qcfg.samples:
            raise UserError(
                f"calibration data {config.calibration} has {len(dataset)} rows but {qcfg.samples} were asked for; "
                f"pass more data or --samples {len(dataset)}"
            )
        if dataset.pairs is not None and "token_type_ids" not in input_names:
            raise UserError(
                f"calibration data has sentence pairs but the model takes only {', '.join(input_names)}; "
                "drop --text-pair-column"
            )
        pad_to = None if config.pad_to is None else min(config.pad_to, tok.max_length)
        samples, batch = qcfg.samples, config.batch_size
        ctx.calibration = lambda: DatasetFeeds(dataset, encoder, input_names, samples, batch, pad_to)
    if config.eval is not None:
        ctx.evaluate = _evaluate_fn(artifact, encoder, config)
    return ctx


def run_quantize(config: QuantizeStageConfig) -> dict[str, Any]:
    """Quantize an artifact; returns a summary (the full stats are in the report file and lineage)."""
    qcfg = config.quantize
    qcfg.check()
    if config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    if qcfg.max_accuracy_drop is not None and config.eval is None:
        raise UserError("--max-accuracy-drop needs an evaluation set; pass --eval DATA")
    if (
        not qcfg.dynamic
        and config.calibration is None
        and qcfg.calibration_cache is None
        and not qcfg.ranges_from_training
    ):
        raise UserError("static quantization needs calibration data; pass --calibration DATA (or --dynamic)")
    out = Path(config.out)
    check_output_dir(out, config.overwrite)
    artifact = ModelArtifact.open(config.model)
    training_ranges, training_ranges_file = None, None
    if qcfg.ranges_from_training:
        ranges_path = artifact.path / QAT_RANGES_FILE
        if not ranges_path.is_file():
            raise UserError(
                f"{config.model} was not trained with QAT (no {QAT_RANGES_FILE}); distill with --qat and export "
                "again, or quantize with --calibration DATA"
            )
        training_ranges, training_ranges_file = read_training_ranges(ranges_path), str(ranges_path)
    if qcfg.num_heads <= 0 or qcfg.hidden_size <= 0:
        heads, hidden = attention_dims(artifact)
        qcfg = qcfg.model_copy(
            update={"num_heads": qcfg.num_heads or heads, "hidden_size": qcfg.hidden_size or hidden}
        )
    with tempfile.TemporaryDirectory(prefix="trimformer-quantize-") as tmp:
        ctx = _context(artifact, config, Path(tmp))
        ctx.training_ranges, ctx.training_ranges_file = training_ranges, training_ranges_file

        def on_written(folder: Path, report: PassReport) -> None:
            for name, path in report.files.items():
                shutil.copy2(path, folder / name)
            (folder / REPORT_FILE).write_text(
                json.dumps(report.stats, indent=1, default=float) + "\n", encoding="utf-8"
            )

        extra = {
            "calibration": config.calibration,
            "eval": config.eval,
            "pad_to": config.pad_to,
            "batch_size": config.batch_size,
        }
        result, report = apply_pass(artifact, "quantize", qcfg, ctx, out, config.overwrite, extra, on_written)
    stats = report.stats
    return {
        "out": str(out),
        "size_mb": round(result.size_bytes() / 1e6, 2),
        "input_size_mb": round(artifact.size_bytes() / 1e6, 2),
        "quantized": stats["quantized"],
        "quantizable": stats["quantizable"],
        "float_nodes": stats["float_nodes"],
        "settings": stats["settings"],
        "calibration": stats.get("calibration"),
        "accuracy_aware": {k: v for k, v in stats.get("accuracy_aware", {}).items() if k != "sensitivity"},
        "output_rel_error": stats["output_rel_error"],
        "seconds": stats["seconds"],
    }


def run_fuse(
    model: str, out: str, config: FuseConfig | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Fuse an artifact's transformer blocks; returns the counts per fusion."""
    out_path = Path(out)
    check_output_dir(out_path, overwrite)
    artifact = ModelArtifact.open(model)
    config = config or FuseConfig()
    if config.num_heads <= 0 or config.hidden_size <= 0:
        heads, hidden = attention_dims(artifact)
        config = config.model_copy(
            update={"num_heads": config.num_heads or heads, "hidden_size": config.hidden_size or hidden}
        )
    with tempfile.TemporaryDirectory(prefix="trimformer-fuse-") as tmp:
        _, report = apply_pass(artifact, "fuse", config, PassContext(scratch=Path(tmp)), out_path, overwrite)
    return {"out": str(out_path), **report.stats}
