"""Graph facts the quantize pass needs.

- :func:`quantized_ops`: refuse graphs that are already quantized.
- :func:`quantizable_nodes`: which nodes the default policy quantizes (projection and
  feed-forward MatMuls with a constant weight, the fused Attention's QKV projection, the embedding
  tables) and, for the report, which ops it leaves in float on purpose.
- the ``MatMulInteger -> Cast -> Mul`` rewrite the quantizer's output gets is
  :func:`trimformer.passes.fuse.integer_matmul.fuse_matmul_integer_to_float`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from trimformer.formats.onnx_ops import QUANTIZED_OPS

__all__ = [
    "Candidate",
    "float_op_summary",
    "name_nodes",
    "quantizable_nodes",
    "quantized_ops",
]

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
