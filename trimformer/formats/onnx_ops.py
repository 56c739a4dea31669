"""ONNX facts both sides read: the op types whose presence marks a model as quantized, and the
opsets the exporter writes.

One list, read by the quantize pass (to refuse a model that is already quantized) and by the
bundle manifest (to record ``quantized``). It is the union of what onnxruntime's quantizers write
(``quantize_static``/``quantize_dynamic`` in QDQ, QOperator and IntegerOps formats, the 4-bit
weight-only quantizers), what onnxruntime's graph optimizer fuses those into when an optimized
model is saved, and what the transformers optimizer makes of a QDQ model for CUDA (``QOrdered*``).

Names are listed one by one rather than matched by a ``Q`` prefix: ``QuickGelu`` is a float op.
"""

from __future__ import annotations

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "QUANTIZED_OPS"]

QUANTIZED_OPS = frozenset(
    {
        # QDQ format, and the activation quantizer of dynamic int8.
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        # IntegerOps format (quantize_dynamic, and static IntegerOps).
        "MatMulInteger",
        "ConvInteger",
        "QAttention",
        "QEmbedLayerNormalization",
        "DynamicQuantizeLSTM",
        # QOperator format (quantize_static with QuantFormat.QOperator).
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearSoftmax",
        "QLinearWhere",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        # onnxruntime graph fusions of the above (also written by the quantize pass itself, see
        # passes/fuse/integer_matmul.py).
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        # 4-bit weight-only quantizers (MatMulNBits, bnb4; MatMulFpQ4 from onnxruntime < 1.17).
        "MatMulNBits",
        "GatherBlockQuantized",
        "MatMulBnb4",
        "MatMulFpQ4",
        # CUDA int8 (transformers optimizer over a QDQ model).
        "QOrderedMatMul",
        "QOrderedAttention",
        "QOrderedLayerNormalization",
        "QOrderedGelu",
        "QOrderedLongformerAttention",
    }
)

# The ONNX opsets the exporter writes (and the recipe accepts): LayerNormalization as one op
# needs 17; older opsets decompose it, which fusion still handles, but
# scaled_dot_product_attention cannot be exported below 14.
DEFAULT_OPSET = 17
MIN_OPSET = 14
MAX_OPSET = 21
