"""Graph facts and small rewrites the quantize pass needs.

- :func:`quantized_ops`: refuse graphs that are already quantized.
- :func:`quantizable_nodes`: which nodes the default policy quantizes (projection and
  feed-forward MatMuls with a constant weight, the fused Attention's QKV projection, the embedding
  tables) and, for the report, which ops it leaves in float on purpose.
- :func:`fuse_matmul_integer_to_float`: onnxruntime's static IntegerOps quantizer writes
  ``MatMulInteger -> Cast -> Mul(Mul(a_scale, w_scale))``; onnxruntime fuses that chain into one
  ``MatMulIntegerToFloat`` kernel only when the scale comes from DynamicQuantizeLinear, so with
  constant scales the three kernels stay (measured: about 10 % slower than dynamic int8). This
  rewrite makes the single kernel with constant scales.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx

__all__ = [
    "QUANTIZED_OPS",
    "Candidate",
    "float_op_summary",
    "fuse_matmul_integer_to_float",
    "name_nodes",
    "quantizable_nodes",
    "quantized_ops",
]

logger = logging.getLogger(__name__)

QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QLinearMatMul",
        "QAttention",
        "QEmbedLayerNormalization",
        "QGemm",
        "ConvInteger",
        "QLinearConv",
        "MatMulNBits",
    }
)
# Ops the default policy keeps in float, with the reason written into the report.
FLOAT_REASONS = {
    "SkipLayerNormalization": "normalization (residual Add + LayerNorm) stays float",
    "LayerNormalization": "normalization stays float",
    "Softmax": "softmax stays float",
    "BiasGelu": "GELU stays float",
    "Gelu": "GELU stays float",
    "FastGelu": "GELU stays float",
    "Add": "residual / embedding / mask Add stays float",
    "Gemm": "pooler and classifier head stay float (few FLOPs, sensitive logits)",
    "EmbedLayerNormalization": "embedding sum + LayerNorm stays float (preset stores no 8-bit tables)",
    "Attention": "attention stays float in this format (onnxruntime has no static QDQ Attention, onnxruntime#8770)",
}


@dataclass(frozen=True)
class Candidate:
    name: str
    op_type: str
    # The activation input whose range the quantizer needs (None for weight-only nodes).
    activation: str | None
    weight: str


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS)
    return dict(counts)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (the quantizer selects and excludes nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_tf{i}"
        seen.add(node.name)


def quantizable_nodes(model: onnx.ModelProto, attention: bool, embeddings: bool) -> list[Candidate]:
    """MatMuls with a constant 2-D weight; fused Attention (QKV projection) and
    EmbedLayerNormalization (tables) when the format has integer kernels for them."""
    inits = {init.name: init for init in model.graph.initializer}
    out: list[Candidate] = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            out.append(Candidate(node.name, node.op_type, node.input[0], node.input[1]))
        elif node.op_type == "Attention" and attention and len(node.input) > 1 and node.input[1] in inits:
            if not any(a.name == "qkv_hidden_sizes" for a in node.attribute):
                out.append(Candidate(node.name, node.op_type, node.input[0], node.input[1]))
        elif (
            node.op_type == "EmbedLayerNormalization"
            and embeddings
            and len(node.input) > 2
            and node.input[2] in inits
        ):
            out.append(Candidate(node.name, node.op_type, None, node.input[2]))
    return out


def float_op_summary(model: onnx.ModelProto, candidates: list[Candidate]) -> dict[str, dict[str, object]]:
    """Per op type left in float by the policy: count and reason."""
    chosen = {c.name for c in candidates}
    counts = Counter(
        n.op_type for n in model.graph.node if n.name not in chosen and n.op_type in FLOAT_REASONS
    )
    return {op: {"count": n, "reason": FLOAT_REASONS[op]} for op, n in sorted(counts.items())}


def fuse_matmul_integer_to_float(model: onnx.ModelProto) -> int:
    """Rewrite ``MatMulInteger -> Cast -> Mul(scales)`` into ``MatMulIntegerToFloat`` in place;
    returns how many times it fired."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.output[0] in graph_outputs:
            continue
        (cast, *rest) = consumers.get(node.output[0], [None])
        if rest or cast is None or cast.op_type != "Cast" or cast.output[0] in graph_outputs:
            continue
        (mul, *rest) = consumers.get(cast.output[0], [None])
        if rest or mul is None or mul.op_type != "Mul":
            continue
        other = next(i for i in mul.input if i != cast.output[0])
        scales = producers.get(other)
        if scales is None or scales.op_type != "Mul":
            continue
        a_scale, w_scale = scales.input
        a_zp = node.input[2] if len(node.input) > 2 else ""
        w_zp = node.input[3] if len(node.input) > 3 else ""
        inputs = [node.input[0], node.input[1], a_scale, w_scale, a_zp, w_zp]
        while inputs and not inputs[-1]:
            inputs.pop()
        replace[id(node)] = onnx.helper.make_node(
            "MatMulIntegerToFloat", inputs, [mul.output[0]], name=node.name, domain="com.microsoft"
        )
        drop.update((id(cast), id(mul)))
    if not replace:
        return 0
    nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
    # Scale-product Mul nodes that nothing reads any more.
    used = {name for n in nodes for name in n.input} | graph_outputs
    nodes = [n for n in nodes if not (n.op_type == "Mul" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    logger.debug("MatMulIntegerToFloat rewrite fired %d times", len(replace))
    return len(replace)
