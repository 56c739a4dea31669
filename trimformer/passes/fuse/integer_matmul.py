"""One ``MatMulIntegerToFloat`` kernel for onnxruntime's static int8 matmuls.

onnxruntime's static IntegerOps quantizer writes ``MatMulInteger -> Cast -> Mul(Mul(a_scale,
w_scale))``; onnxruntime fuses that chain into one ``MatMulIntegerToFloat`` kernel only when the
scale comes from DynamicQuantizeLinear, so with constant scales the three kernels stay (measured:
about 10 % slower than dynamic int8). The rule (``rules.FuseMatMulIntegerToFloat``) makes the
single kernel with constant scales.
"""

from __future__ import annotations

import onnx

from trimformer.passes.fuse.rewrite import RuleSetsPass, apply_to_proto
from trimformer.passes.fuse.rules import integer_matmul_rules

__all__ = ["IntegerMatMulPass", "fuse_matmul_integer_to_float"]


class IntegerMatMulPass(RuleSetsPass):
    """``MatMulInteger -> Cast -> Mul(scales)`` -> ``MatMulIntegerToFloat``, in place."""

    def __init__(self) -> None:
        super().__init__({"matmul_integer_to_float": integer_matmul_rules()})


def fuse_matmul_integer_to_float(model: onnx.ModelProto) -> int:
    """:class:`IntegerMatMulPass` on a ``ModelProto``, in place; returns how often it fired."""
    return apply_to_proto(IntegerMatMulPass(), model)["matmul_integer_to_float"]
