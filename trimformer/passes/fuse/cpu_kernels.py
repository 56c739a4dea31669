"""The pass that picks the faster onnxruntime CPU kernels for the same arithmetic.

Measured with onnxruntime 1.32 on this project's 2-core machines (2 threads, batch 1 x 128 x 384,
median of 2000 runs; ``docs/QUANTIZATION.md``):

- ``SkipLayerNormalization`` took 155 us where ``Add`` + ``LayerNormalization`` took 50-60 us: the
  contrib kernel is about 3x slower than the ONNX LayerNorm kernel plus an elementwise add. For
  MiniLM-L6 (12 of them) that is 1.2 ms of a 9 ms int8 inference. onnxruntime's session-level
  ``SkipLayerNormFusion`` turns ``Add -> LayerNormalization`` back into the slow op, but it only
  matches ``Add``; the residual sum is therefore written as ``Sum``, the variadic ONNX op with the
  same arithmetic, which no fusion rewrites.
- ``BiasGelu`` after an int8 ``MatMulIntegerToFloat`` costs more than ``Gelu`` with the bias
  folded into the matmul's own optional bias input (0.80 ms against 0.53 ms for six layers).

- Padding made every attention layer 2x slower (QAttention 2.4 -> 4.8 ms for six layers at
  1 x 128 with a 12-token tweet): the fused Attention adds ``mask_filter_value`` (-10000) to masked
  scores, MLAS's softmax clamps ``exp`` at -103.97 and returns the smallest denormal float for
  every masked key, and the probabilities x values product then runs on denormal operands, which
  x86 handles in microcode. With ``mask_filter_value = -50`` a masked key's weight is
  ``exp(-50) = 2e-22`` of the largest, a normal float that vanishes in the float32 sums (the
  logits of 1000 padded test tweets were bit-identical to -10000's) and the slowdown is gone
  (8.6 -> 6.5 ms). Sessions that flush denormals to zero (``session.set_denormal_as_zero``) get
  the same speed from the original graph; this makes the shipped graph fast in a default session.

All are exact up to float summation order. None applies to GPU execution providers, whose
fused kernels are the fast ones; the CPU presets turn them on.

The rules themselves are pattern / check / rewrite rules on onnx-ir (``rules.py``);
:class:`CpuKernelsPass` runs them and checks the result (``rewrite.py``), and
:func:`prefer_cpu_kernels` is the ``ModelProto`` entry for the fuse and quantize passes, which
hold onnxruntime's protos.
"""

from __future__ import annotations

import onnx

from trimformer.passes.fuse.rewrite import RuleSetsPass, apply_to_proto
from trimformer.passes.fuse.rules import (
    MASK_FILTER_VALUE,
    bias_gelu_rules,
    mask_filter_rules,
    skip_layer_norm_rules,
)

__all__ = ["MASK_FILTER_VALUE", "CpuKernelsPass", "prefer_cpu_kernels"]


class CpuKernelsPass(RuleSetsPass):
    """All three rewrites, in place; stats: how often each fired."""

    def __init__(self, mask_filter_value: float = MASK_FILTER_VALUE) -> None:
        super().__init__(
            {
                "bias_gelu_folded": bias_gelu_rules(),
                "skip_layer_norm_split": skip_layer_norm_rules(),
                "mask_filter_bounded": mask_filter_rules(mask_filter_value),
            }
        )


def prefer_cpu_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """:class:`CpuKernelsPass` on a ``ModelProto``, in place; returns how often each rewrite fired."""
    return apply_to_proto(CpuKernelsPass(), model)
