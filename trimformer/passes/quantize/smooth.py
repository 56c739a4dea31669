"""SmoothQuant-style scaling (Xiao et al. 2022) for static int8: per-channel factors moved into the weights.

BERT's residual stream has a few outlier channels (Bondarenko et al. 2021); with one static scale
per activation tensor they squeeze every other channel into a handful of int8 levels. For each
quantized product ``x @ W`` we pick per-input-channel factors
``s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha)`` and compute ``(x / s) @ (diag(s) W)``: the same
product, with the activation range flattened and the weight rows scaled up.

:func:`insert_smoothing` writes ``x / s`` as an explicit ``Mul`` before the node (so onnxruntime's
calibrator sees the smoothed range) and scales the weight. Post-LN BERT needs the explicit Mul:
its LayerNorm output also feeds the residual, so ``1/s`` cannot be folded into the LayerNorm
weights the way SmoothQuant does for pre-LN models. Folding the Mul into the following
QuantizeLinear as a per-axis scale was tried and measured 4.6x slower (onnxruntime's per-axis
QuantizeLinear is a slow kernel); the Mul costs about 3 % (1.03x dynamic int8 against 1.01x).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from trimformer.passes.quantize.graph import Candidate
from trimformer.passes.quantize.sensitivity import capture_inputs

__all__ = ["ABSMAX_SUFFIX", "SMOOTH_SUFFIX", "channel_absmax", "insert_smoothing"]

logger = logging.getLogger(__name__)

SMOOTH_SUFFIX = "_smooth"
# Per-channel maxima are kept in the ranges cache under "<tensor>::absmax", so a cached run can
# rebuild the same smoothing without data (onnxruntime's quantizer ignores unknown tensor names).
ABSMAX_SUFFIX = "::absmax"


def channel_absmax(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    captured = capture_inputs(model, names, feeds)
    return {
        name: np.max(np.stack([np.abs(a.reshape(-1, a.shape[-1])).max(axis=0) for a in arrays]), axis=0)
        for name, arrays in captured.items()
    }


def insert_smoothing(
    model: onnx.ModelProto, candidates: list[Candidate], amax: dict[str, np.ndarray], alpha: float
) -> int:
    """Insert ``Mul(x, 1/s)`` before each candidate with an activation and scale its weight rows,
    in place; ``amax`` holds each activation's per-channel absolute maximum. Returns how many
    nodes were smoothed."""
    inits = {init.name: init for init in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    producers = {out: n for n in model.graph.node for out in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    for out in model.graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    new_nodes: dict[str, onnx.NodeProto] = {}
    count = folded = 0
    for cand in candidates:
        if cand.activation is None or cand.activation not in amax:
            continue
        node = nodes[cand.name]
        weight = numpy_helper.to_array(inits[cand.weight]).astype(np.float32)
        a = amax[cand.activation].astype(np.float64)
        w = np.abs(weight).max(axis=1).astype(np.float64)
        if a.shape[0] != weight.shape[0]:
            continue
        s = np.where((a > 0) & (w > 0), a**alpha / np.maximum(w, 1e-8) ** (1.0 - alpha), 1.0)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        inits[cand.weight].CopyFrom(numpy_helper.from_array(weight * s[:, None], cand.weight))
        if _fold_into_attention_values(producers.get(cand.activation), inits, readers, s):
            folded += 1
            count += 1
            continue
        inv_name = f"{cand.name}{SMOOTH_SUFFIX}_inv_scale"
        out_name = f"{cand.activation}{SMOOTH_SUFFIX}_{count}"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv_name))
        new_nodes[cand.name] = onnx.helper.make_node(
            "Mul", [cand.activation, inv_name], [out_name], name=f"{cand.name}{SMOOTH_SUFFIX}"
        )
        node.input[0] = out_name
        # The calibrator only measures tensors whose type it can see.
        source = next((v for v in model.graph.value_info if v.name == cand.activation), None)
        if source is not None:
            typed = onnx.ValueInfoProto()
            typed.CopyFrom(source)
            typed.name = out_name
            model.graph.value_info.append(typed)
        count += 1
    if count:
        ordered: list[onnx.NodeProto] = []
        for node in model.graph.node:
            if node.name in new_nodes:
                ordered.append(new_nodes[node.name])
            ordered.append(node)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    logger.debug("smoothing on %d nodes, %d folded into attention values (alpha %.2f)", count, folded, alpha)
    return count


def _fold_into_attention_values(
    producer: onnx.NodeProto | None,
    inits: dict[str, onnx.TensorProto],
    readers: dict[str, int],
    s: np.ndarray,
) -> bool:
    """``x / s`` for free when ``x`` is a fused Attention's output read only by this node: each
    context channel is a softmax-weighted sum of one value channel, so dividing the value
    projection's columns and bias by ``s`` divides the output exactly, with no Mul at run time."""
    if (
        producer is None
        or producer.op_type != "Attention"
        or producer.domain != "com.microsoft"
        or readers.get(producer.output[0], 0) != 1
        or len(producer.input) < 3
        or producer.input[1] not in inits
        or producer.input[2] not in inits
    ):
        return False
    weight = numpy_helper.to_array(inits[producer.input[1]]).astype(np.float32)
    bias = numpy_helper.to_array(inits[producer.input[2]]).astype(np.float32)
    width = s.shape[0]
    if weight.ndim != 2 or weight.shape[1] < width or bias.shape != (weight.shape[1],):
        return False
    weight[:, -width:] /= s[None, :]
    bias[-width:] /= s
    inits[producer.input[1]].CopyFrom(numpy_helper.from_array(weight, producer.input[1]))
    inits[producer.input[2]].CopyFrom(numpy_helper.from_array(bias, producer.input[2]))
    return True
