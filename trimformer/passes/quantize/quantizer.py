"""Drive onnxruntime's quantizers on chosen nodes of a typed float graph, and read back which
nodes became integer ops.

``qoperator`` (and ``dynamic``) use onnxruntime's IntegerOps operators; with calibrated ranges
their scales are constants, and ``MatMulInteger -> Cast -> Mul`` is rewritten into one
``MatMulIntegerToFloat`` (graph.py). ``qdq`` uses its QDQ quantizer with MatMul outputs left float.
"""

from __future__ import annotations

from typing import Any

import onnx

from trimformer.errors import UserError
from trimformer.passes.fuse.cpu_kernels import prefer_cpu_kernels
from trimformer.passes.fuse.integer_matmul import fuse_matmul_integer_to_float
from trimformer.passes.quantize.embeddings import quantize_other_tables, quantize_word_embeddings
from trimformer.passes.quantize.graph import Candidate
from trimformer.passes.quantize.presets import QuantizerSettings

__all__ = ["quantize_model", "quantized_names"]

_OP_TYPES = ["MatMul", "Attention", "EmbedLayerNormalization"]
# What onnxruntime's IntegerOps quantizer (and our rewrite) turn a candidate into.
_INTEGER_OPS = {"MatMulInteger", "MatMulIntegerToFloat", "QAttention", "QEmbedLayerNormalization"}


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _quantizer(
    work: onnx.ModelProto, ranges: Any, settings: QuantizerSettings, nodes: list[str], dynamic: bool
) -> Any:
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    extra: dict[str, Any] = {
        "MatMulConstBOnly": True,
        "ActivationSymmetric": settings.symmetric_activations,
        "WeightSymmetric": True,
    }
    act, weight = _qtype(settings.activation_type), _qtype(settings.weight_type)
    per_channel, reduce_range = settings.per_channel, settings.reduce_range
    if dynamic or settings.integer_ops:
        static = not dynamic
        return ONNXQuantizer(
            work,
            per_channel,
            reduce_range,
            QuantizationMode.IntegerOps,
            static,
            weight,
            act,
            ranges if static else None,
            nodes,
            [],
            _OP_TYPES,
            extra,
        )
    # MatMul outputs stay float: onnxruntime then runs DQ -> MatMul as MatMulIntegerToFloat
    # instead of requantizing every output (QLinearMatMul + DequantizeLinear, measured slower).
    extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
    return QDQQuantizer(work, per_channel, reduce_range, weight, act, ranges, nodes, [], ["MatMul"], extra)


def quantize_model(
    model: onnx.ModelProto,
    ranges: Any,
    settings: QuantizerSettings,
    nodes: list[str],
    dynamic: bool = False,
    table_bits: int = 8,
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Quantize ``nodes`` of a typed float model with onnxruntime's quantizers; returns the model
    and the counts of our post-rewrites. ``table_bits``: the word table's, where no embedding
    fusion carries it (QEmbedLayerNormalization is 8-bit)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    try:
        quantized = _quantizer(work, ranges, settings, nodes, dynamic).quantize_model()
    except Exception as exc:
        raise UserError(f"onnxruntime's quantizer failed: {' '.join(str(exc).split())[:300]}") from exc
    rewrites: dict[str, int] = {"matmul_integer_to_float": 0}
    if not dynamic and settings.integer_ops:
        rewrites["matmul_integer_to_float"] = fuse_matmul_integer_to_float(quantized)
        # The smoothing Muls stay: folding them into per-axis QuantizeLinear was measured 3.7-4.6x
        # slower than dynamic int8 (onnxruntime's per-axis QuantizeLinear is a slow kernel).
    if settings.cpu_kernels and (dynamic or settings.integer_ops):
        rewrites.update(prefer_cpu_kernels(quantized))
    if settings.embeddings and not any(n.op_type == "QEmbedLayerNormalization" for n in quantized.graph.node):
        # No embedding fusion to carry the tables in 8 bits (RoBERTa, a first layer pruned headless,
        # or a 4-bit table asked for: the fusion was left off).
        rewrites[f"word_embeddings_{table_bits}bit"] = quantize_word_embeddings(quantized, bits=table_bits)
        if table_bits == 4:
            rewrites["position_tables_8bit"] = quantize_other_tables(quantized)
    return quantized, rewrites


def quantized_names(model: onnx.ModelProto, candidates: list[Candidate]) -> list[str]:
    """Candidates that really became integer ops: onnxruntime names the integer node
    ``<name>_quant`` (IntegerOps), or keeps the MatMul and feeds it a DequantizeLinear (QDQ)."""
    int_nodes = {n.name for n in model.graph.node if n.op_type in _INTEGER_OPS}
    producers = {o: n for n in model.graph.node for o in n.output}
    dq_fed = {
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in producers
        and producers[n.input[1]].op_type == "DequantizeLinear"
    }
    return [c.name for c in candidates if c.name in dq_fed or f"{c.name}_quant" in int_nodes]
