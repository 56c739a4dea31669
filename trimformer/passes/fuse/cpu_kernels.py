"""Rewrites that pick the faster onnxruntime CPU kernels for the same arithmetic.

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
"""

from __future__ import annotations

import logging

import onnx
from onnx import helper

__all__ = [
    "MASK_FILTER_VALUE",
    "bound_mask_filter",
    "fold_bias_gelu",
    "prefer_cpu_kernels",
    "split_skip_layer_norm",
]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
MASK_FILTER_VALUE = -50.0
# MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?)
_MIF_BIAS_INPUT = 6


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _consumers(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                counts[name] = counts.get(name, 0) + 1
    for out in graph.output:
        counts[out.name] = counts.get(out.name, 0) + 1
    return counts


def _take_bias(producer: onnx.NodeProto | None, bias: str, consumers: dict[str, int]) -> bool:
    """Move ``bias`` into an int8 matmul's own bias input when it is free and its only reader."""
    if (
        producer is None
        or producer.op_type != "MatMulIntegerToFloat"
        or producer.domain != MS_DOMAIN
        or consumers.get(producer.output[0], 0) != 1
        or (len(producer.input) > _MIF_BIAS_INPUT and producer.input[_MIF_BIAS_INPUT])
    ):
        return False
    while len(producer.input) < _MIF_BIAS_INPUT:
        producer.input.append("")
    producer.input.append(bias)
    return True


def split_skip_layer_norm(model: onnx.ModelProto) -> int:
    """``SkipLayerNormalization(x, skip, gamma, beta, bias)`` -> ``Sum`` + ``LayerNormalization``,
    in place; the bias goes into the producing int8 matmul where it can. Returns the count."""
    if _opset(model) < 17:
        return 0
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        extra_outputs = [o for o in node.output[1:] if o and consumers.get(o)]
        if node.op_type != "SkipLayerNormalization" or node.domain != MS_DOMAIN or extra_outputs:
            nodes.append(node)
            continue
        x, skip, gamma = node.input[0], node.input[1], node.input[2]
        beta = node.input[3] if len(node.input) > 3 else ""
        bias = node.input[4] if len(node.input) > 4 else ""
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        terms = [x, skip]
        if bias and not (
            _take_bias(producers.get(x), bias, consumers) or _take_bias(producers.get(skip), bias, consumers)
        ):
            terms.append(bias)
        summed = f"{node.name}_residual_sum"
        nodes.append(helper.make_node("Sum", terms, [summed], name=f"{node.name}_sum"))
        ln_inputs = [summed, gamma] + ([beta] if beta else [])
        nodes.append(
            helper.make_node(
                "LayerNormalization", ln_inputs, [node.output[0]], name=node.name, axis=-1, epsilon=eps
            )
        )
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def fold_bias_gelu(model: onnx.ModelProto) -> int:
    """``MatMulIntegerToFloat -> BiasGelu(bias)`` -> ``MatMulIntegerToFloat(bias) -> Gelu``, in place."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    count = 0
    for node in graph.node:
        if node.op_type != "BiasGelu" or node.domain != MS_DOMAIN or len(node.input) != 2:
            continue
        if _take_bias(producers.get(node.input[0]), node.input[1], consumers):
            node.op_type = "Gelu"
            del node.input[1]
            count += 1
    return count


def bound_mask_filter(model: onnx.ModelProto, value: float = MASK_FILTER_VALUE) -> int:
    """Set ``mask_filter_value`` on the fused (Q)Attention nodes that use the default, in place."""
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("Attention", "QAttention") or node.domain != MS_DOMAIN:
            continue
        if any(a.name == "mask_filter_value" for a in node.attribute):
            continue
        node.attribute.append(helper.make_attribute("mask_filter_value", float(value)))
        count += 1
    return count


def prefer_cpu_kernels(model: onnx.ModelProto) -> dict[str, int]:
    """All three rewrites; returns how often each fired."""
    counts = {
        "bias_gelu_folded": fold_bias_gelu(model),
        "skip_layer_norm_split": split_skip_layer_norm(model),
        "mask_filter_bounded": bound_mask_filter(model),
    }
    logger.debug("CPU kernel rewrites: %s", counts)
    return counts
