"""Activation ranges learned in quantization-aware training, mapped onto a fused graph.

``trimformer distill --qat`` writes ``qat_ranges.json`` next to the student's weights (its schema,
reader and weight digest are in :mod:`trimformer.formats.qat_ranges`), and ``trimformer export``
copies it into the artifact. ``quantize --ranges-from-training`` then uses those ranges instead
of calibrating:

* every quantizable node (MatMul with a constant weight, the fused Attention) is matched to its
  Linear by the weight's values: TorchScript names weights ``onnx::MatMul_123`` and stores them
  transposed (``[in, out]``), so the digest is taken of the transposed weight; the fused
  Attention's packed ``[hidden, 3 * hidden]`` weight is split into its Q, K and V blocks;
* the node's activation input gets the trained range (Q, K and V were trained with one shared
  quantizer, so the QAttention input has one range), from which onnxruntime's quantizer derives
  the same scale and zero point training used;
* a node without a trained Linear, or a trained Linear without a node, means the ranges belong to
  another graph (a pruned one, say): refused with exit 2.

No torch here: passes run without PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from trimformer.errors import UserError
from trimformer.formats.qat_ranges import QAT_RANGES_FILE, weight_digest
from trimformer.passes.base import weight_changing_passes
from trimformer.passes.quantize.graph import Candidate
from trimformer.passes.quantize.presets import QuantizerSettings

__all__ = [
    "carries_training_ranges",
    "check_training_options",
    "check_training_settings",
    "training_ranges",
]

logger = logging.getLogger(__name__)

# What training simulated; a preset that quantizes differently would not compute what was trained.
_TRAINED_SETTINGS = {
    "format": "qoperator",
    "activation_type": "uint8",
    "weight_type": "int8",
    "per_channel": True,
    "reduce_range": False,
    "symmetric_activations": False,
}


def carries_training_ranges(folder: Path, lineage_steps: list[str]) -> bool:
    """Whether an artifact holds training ranges that can still fit its graph (no weight-changing
    step such as pruning ran after the export)."""
    if not (folder / QAT_RANGES_FILE).is_file():
        return False
    after_export = lineage_steps[lineage_steps.index("export") + 1 :] if "export" in lineage_steps else []
    return not set(after_export) & weight_changing_passes()


def check_training_options(config: Any) -> None:
    """Refuse quantize options that contradict ranges from training (a QuantizeConfig)."""
    if config.dynamic:
        raise UserError("--ranges-from-training and --dynamic exclude each other; drop one")
    if config.calibration_cache is not None:
        raise UserError("--ranges-from-training and --calibration-cache exclude each other; drop one")
    if config.smooth_alpha:
        raise UserError(
            "SmoothQuant (smooth_alpha) cannot be used with ranges from training: training did not simulate it; "
            "drop smooth_alpha"
        )


def check_training_settings(
    settings: QuantizerSettings, record: dict[str, Any], preset: str
) -> QuantizerSettings:
    """The quantizer settings for a ranges-from-training run: those training simulated (else a
    one-line error), SmoothQuant off (training did not simulate it), the embedding tables
    quantized exactly when training simulated them."""
    for key, want in _TRAINED_SETTINGS.items():
        if getattr(settings, key) != want:
            raise UserError(
                f"the QAT student was trained for u8 activations x s8 per-channel weights (preset cpu-vnni or "
                f"arm64, qoperator); preset {preset!r} quantizes with {key}={getattr(settings, key)!r}"
            )
    simulated = bool(record.get("embeddings", {}).get("simulated", False))
    return dataclasses.replace(settings, smooth_alpha=0.0, embeddings=simulated, ranges_from_training=True)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def training_ranges(
    model: onnx.ModelProto, candidates: list[Candidate], record: dict[str, Any], source: str
) -> tuple[Any, dict[str, Any]]:
    """onnxruntime ``TensorsData`` for the candidates' activations from the trained ranges, and
    the match for the report: ``{"nodes": [{node, op, activation, weight, modules}], ...}``."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    by_digest: dict[str, dict[str, Any]] = {}
    for entry in record["linears"]:
        by_digest.setdefault(str(entry["weight_sha256"]), entry)
    inits = _initializers(model)
    used: set[str] = set()
    ranges: dict[str, tuple[float, float, str]] = {}
    nodes: list[dict[str, Any]] = []
    embed = [c for c in candidates if c.op_type == "EmbedLayerNormalization"]
    simulated = bool(record.get("embeddings", {}).get("simulated", False))
    if simulated and not embed:
        raise UserError(
            f"the training ranges in {source} do not match this graph: training simulated 8-bit embedding "
            "tables but the graph has no fused EmbedLayerNormalization to quantize"
        )
    for c in candidates:
        if c.op_type == "EmbedLayerNormalization":
            continue
        weight = numpy_helper.to_array(inits[c.weight]).astype(np.float32, copy=False)
        blocks = (
            np.split(weight, 3, axis=1) if c.op_type == "Attention" and weight.shape[1] % 3 == 0 else [weight]
        )
        entries = [by_digest.get(weight_digest(b)) for b in blocks]
        if any(e is None for e in entries):
            raise UserError(
                f"the training ranges in {source} do not match this graph: node {c.name!r} ({c.op_type}) has no "
                "trained Linear with its weights; quantize with --calibration DATA instead"
            )
        found = [e for e in entries if e is not None]
        bounds = {(float(e["lowest"]), float(e["highest"])) for e in found}
        if len(bounds) != 1 or c.activation is None:
            raise UserError(
                f"the training ranges in {source} do not match this graph: the inputs of node {c.name!r} were "
                "trained with different ranges; distill again with --qat"
            )
        lo, hi = bounds.pop()
        previous = ranges.get(c.activation)
        if previous is not None and previous[:2] != (lo, hi):
            raise UserError(
                f"the training ranges in {source} do not match this graph: tensor {c.activation!r} has two trained ranges"
            )
        ranges[c.activation] = (lo, hi, found[0]["quantizer"])
        used.update(str(e["module"]) for e in found)
        nodes.append(
            {
                "node": c.name,
                "op": c.op_type,
                "activation": c.activation,
                "weight": c.weight,
                "modules": [str(e["module"]) for e in found],
            }
        )
    unused = [str(e["module"]) for e in record["linears"] if str(e["module"]) not in used]
    if unused:
        raise UserError(
            f"the training ranges in {source} do not match this graph: {len(unused)} trained Linear layers have "
            f"no node (e.g. {unused[0]!r}); was the model pruned or changed after export?"
        )
    data = {
        name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
        for name, (lo, hi, _) in ranges.items()
    }
    logger.info("training ranges: %d activations of %d nodes from %s", len(data), len(nodes), source)
    info = {
        "method": "training",
        "source": Path(source).name,
        "activations": len(data),
        "embeddings_8bit": simulated,
        "nodes": nodes,
    }
    return TensorsData(CalibrationMethod.MinMax, data), info
