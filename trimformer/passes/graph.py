"""Finding a Transformer encoder's blocks in an ONNX graph, by pattern.

Two block kinds are recognised, in any exporter's output that has their shape:

* **attention**: three projections ``MatMul(x, W) [+ bias]`` split into heads by
  ``Reshape``/``Transpose``, ``MatMul(Q, K^T)`` -> scale/bias adds -> ``Softmax`` ->
  ``MatMul(probs, V)`` -> ``Transpose`` -> ``Reshape`` -> output projection; or the fused
  ``com.microsoft.Attention`` (packed QKV weight, ``num_heads``) followed by its output projection.
* **feed-forward**: ``MatMul(x, W1)`` -> a closed region of per-element ops (bias, GELU, ReLU, the
  fused ``BiasGelu``/``FastGelu``) -> ``MatMul(h, W2)``, with ``W1: [d, f]`` and ``W2: [f, d]``.

Both must end in a residual connection (``Add`` with the block's input stream, or a fused
``SkipLayerNormalization``). Layer ``i`` is the ``i``-th attention block and the ``i``-th
feed-forward block in graph order. A graph with neither is refused, naming what was looked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from trimformer.errors import UserError

__all__ = [
    "AttentionBlock",
    "EncoderLayout",
    "FFNBlock",
    "Linear",
    "Residual",
    "const_array",
    "find_blocks",
    "reshape_entries",
]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Ops that act on each element (or broadcast a scalar / per-channel constant): a neuron's value
# passes through them without mixing with other neurons.
ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Erf",
    "Tanh",
    "Sigmoid",
    "Relu",
    "LeakyRelu",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
    "Pow",
    "Sqrt",
    "Exp",
    "Neg",
    "Softplus",
    "HardSigmoid",
    "Clip",
    "Identity",
}
_LAYOUT = {"Transpose", "Reshape"}


def _is_ms(node: ir.Node, op: str) -> bool:
    return node.op_type == op and node.domain == MS_DOMAIN


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer, Constant node, or Identity of one), else None."""
    seen = 0
    while value is not None and seen < 16:
        seen += 1
        if value.const_value is not None:
            return np.asarray(value.const_value.numpy())
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type == "Identity":
            value = producer.inputs[0]
            continue
        if producer.op_type == "Constant":
            attr = producer.attributes.get("value")
            if attr is not None:
                return np.asarray(attr.as_tensor().numpy())
            for key in ("value_int", "value_float"):
                if key in producer.attributes:
                    return np.asarray(producer.attributes[key].value)
            for key in ("value_ints", "value_floats"):
                if key in producer.attributes:
                    return np.asarray(list(producer.attributes[key].value))
        return None
    return None


@dataclass(eq=False)
class Linear:
    """``MatMul(x, W)`` with a constant 2-D ``W``, and the constant bias ``Add`` after it, if any."""

    matmul: ir.Node
    bias_add: ir.Node | None = None
    bias_index: int = 0

    @property
    def weight(self) -> np.ndarray:
        arr = const_array(self.matmul.inputs[1])
        assert arr is not None
        return arr

    @property
    def bias(self) -> np.ndarray | None:
        if self.bias_add is None:
            return None
        return const_array(self.bias_add.inputs[self.bias_index])

    @property
    def input(self) -> ir.Value:
        value = self.matmul.inputs[0]
        assert value is not None
        return value

    @property
    def out(self) -> ir.Value:
        """The projection's output after its bias."""
        node = self.bias_add if self.bias_add is not None else self.matmul
        return node.outputs[0]


@dataclass(eq=False)
class Residual:
    """Where a block's branch joins the residual stream.

    ``node`` is an ``Add`` (branch at ``branch_index``, stream at the other input) or a fused
    ``SkipLayerNormalization`` whose inputs 0/1 are branch and stream and whose input 4 is the
    branch's bias.
    """

    node: ir.Node
    branch_index: int
    skip: ir.Value
    fused_bias: ir.Value | None = None


@dataclass(eq=False)
class AttentionBlock:
    num_heads: int
    head_dim: int
    out: Linear
    residual: Residual
    q: Linear | None = None
    k: Linear | None = None
    v: Linear | None = None
    fused: ir.Node | None = None
    split_reshapes: list[ir.Node] = field(default_factory=list)
    merge_reshape: ir.Node | None = None
    # Adds on the attention scores: (node, input index of the non-score operand).
    score_biases: list[tuple[ir.Node, int]] = field(default_factory=list)

    @property
    def context(self) -> ir.Value:
        """The merged per-head context that enters the output projection: ``[batch, seq, H*d]``."""
        return self.out.input


@dataclass(eq=False)
class FFNBlock:
    size: int
    up: ir.Node
    down: Linear
    residual: Residual
    region: list[ir.Node] = field(default_factory=list)
    # Per-neuron constants inside the region (biases): (node, input index).
    channel_consts: list[tuple[ir.Node, int]] = field(default_factory=list)

    @property
    def activation(self) -> ir.Value:
        value = self.down.matmul.inputs[0]
        assert value is not None
        return value


@dataclass
class Layer:
    index: int
    attention: AttentionBlock
    ffn: FFNBlock


@dataclass
class EncoderLayout:
    layers: list[Layer]
    hidden_size: int
    fused: bool

    @property
    def num_heads(self) -> int:
        return max(layer.attention.num_heads for layer in self.layers)

    @property
    def head_dim(self) -> int:
        return self.layers[0].attention.head_dim

    @property
    def ffn_size(self) -> int:
        return max(layer.ffn.size for layer in self.layers)

    def describe(self) -> str:
        heads = [layer.attention.num_heads for layer in self.layers]
        ffn = [layer.ffn.size for layer in self.layers]
        return (
            f"{len(self.layers)} layers, hidden {self.hidden_size}, heads {heads} x {self.head_dim}, "
            f"ffn {ffn}{' (fused attention)' if self.fused else ''}"
        )


# -- helpers -------------------------------------------------------------------------------------
def _single_consumer(value: ir.Value) -> ir.Node | None:
    consumers = value.consumers()
    return consumers[0] if len(consumers) == 1 and not value.is_graph_output() else None


def _as_linear(node: ir.Node | None) -> Linear | None:
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or const_array(node.inputs[0]) is not None:
        return None
    linear = Linear(node)
    nxt = _single_consumer(node.outputs[0])
    if nxt is not None and nxt.op_type == "Add" and nxt.domain in ("", "ai.onnx"):
        other = 1 if nxt.inputs[0] is node.outputs[0] else 0
        bias = const_array(nxt.inputs[other])
        if bias is not None and bias.shape == (weight.shape[1],):
            linear.bias_add = nxt
            linear.bias_index = other
    return linear


def _residual(linear: Linear) -> Residual | None:
    node = _single_consumer(linear.out)
    if node is None:
        return None
    if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        index = 0 if node.inputs[0] is linear.out else 1
        other = node.inputs[1 - index]
        if other is None or const_array(other) is not None:
            return None
        return Residual(node, index, other)
    if _is_ms(node, "SkipLayerNormalization") and linear.bias_add is None:
        index = 0 if node.inputs[0] is linear.out else 1
        if node.inputs[index] is not linear.out:
            return None
        other = node.inputs[1 - index]
        if other is None:
            return None
        bias = node.inputs[4] if len(node.inputs) > 4 else None
        return Residual(node, index, other, bias)
    return None


def reshape_entries(reshape: ir.Node) -> list[tuple[int | None, ir.Value, int]] | None:
    """The target shape of a Reshape as (constant or None, source value, offset in source).

    Handles a constant shape and a Concat of constants and one-element dynamic parts; None when
    the shape is built some other way.
    """
    shape = reshape.inputs[1]
    if shape is None:
        return None
    arr = const_array(shape)
    if arr is not None:
        return [(int(v), shape, i) for i, v in enumerate(arr.reshape(-1))]
    producer = shape.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    entries: list[tuple[int | None, ir.Value, int]] = []
    for part in producer.inputs:
        if part is None:
            return None
        arr = const_array(part)
        if arr is not None:
            entries.extend((int(v), part, i) for i, v in enumerate(arr.reshape(-1)))
            continue
        dims = part.shape
        if dims is not None and (len(dims) != 1 or dims[0] != 1):
            return None
        entries.append((None, part, 0))
    return entries


# -- attention -----------------------------------------------------------------------------------
def _walk_to_projection(value: ir.Value | None) -> tuple[Linear, list[ir.Node]] | str:
    """From a head-split Q/K/V tensor back to its projection, collecting the Reshapes on the way."""
    reshapes: list[ir.Node] = []
    for _ in range(8):
        if value is None:
            return "a missing input"
        node = value.producer()
        if node is None:
            return "a graph input instead of a projection"
        if node.op_type in _LAYOUT:
            if node.op_type == "Reshape":
                reshapes.append(node)
            value = node.inputs[0]
            continue
        if node.op_type in ("Mul", "Div") and const_array(node.inputs[1]) is not None:
            if const_array(node.inputs[1]).size != 1:  # type: ignore[union-attr]
                return f"a non-scalar {node.op_type} on a head tensor"
            value = node.inputs[0]
            continue
        if node.op_type == "Mul" and const_array(node.inputs[0]) is not None:
            if const_array(node.inputs[0]).size != 1:  # type: ignore[union-attr]
                return "a non-scalar Mul on a head tensor"
            value = node.inputs[1]
            continue
        if node.op_type == "Add":
            # The projection's bias: step over it to the MatMul.
            for index in (0, 1):
                if const_array(node.inputs[index]) is not None:
                    value = node.inputs[1 - index]
                    break
            else:
                return "a non-constant Add on a head tensor"
            continue
        linear = _as_linear(node)
        if linear is None:
            return f"{node.op_type} where a projection MatMul was expected"
        return linear, reshapes
    return "too long a chain between projection and attention"


def _scores_matmul(
    value: ir.Value | None, biases: list[tuple[ir.Node, int]], depth: int = 0
) -> ir.Node | None:
    """From the Softmax input back through scale and bias ops to ``MatMul(Q, K^T)``."""
    if value is None or depth > 6:
        return None
    node = value.producer()
    if node is None:
        return None
    if (
        node.op_type == "MatMul"
        and const_array(node.inputs[1]) is None
        and const_array(node.inputs[0]) is None
    ):
        return node
    if node.op_type in ("Mul", "Div") and const_array(node.inputs[1]) is not None:
        return _scores_matmul(node.inputs[0], biases, depth + 1)
    if node.op_type == "Add":
        for index in (0, 1):
            found: list[tuple[ir.Node, int]] = []
            mm = _scores_matmul(node.inputs[index], found, depth + 1)
            if mm is not None:
                biases.extend(found)
                biases.append((node, 1 - index))
                return mm
    return None


def _unfused_attention(softmax: ir.Node) -> AttentionBlock | str:
    score_biases: list[tuple[ir.Node, int]] = []
    qk = _scores_matmul(softmax.inputs[0], score_biases)
    if qk is None:
        return "no MatMul(Q, K^T) before the Softmax"
    probs = softmax.outputs[0]
    ctx = next((n for n in probs.consumers() if n.op_type == "MatMul" and n.inputs[0] is probs), None)
    if ctx is None:
        return "no MatMul(probs, V) after the Softmax"
    sides = []
    for value in (qk.inputs[0], qk.inputs[1], ctx.inputs[1]):
        found = _walk_to_projection(value)
        if isinstance(found, str):
            return found
        sides.append(found)
    (q, q_reshapes), (k, k_reshapes), (v, v_reshapes) = sides
    if not (q.input is k.input is v.input):
        return "Q, K and V do not read the same input (not self-attention)"
    # Context: Transpose -> Reshape -> output projection.
    node = _single_consumer(ctx.outputs[0])
    merge = None
    for _ in range(3):
        if node is None:
            return "the attention context has several consumers"
        if node.op_type == "Reshape":
            merge = node
        if node.op_type not in _LAYOUT:
            break
        node = _single_consumer(node.outputs[0])
    out = _as_linear(node)
    if out is None or merge is None:
        return "no Reshape and output projection after the attention context"
    residual = _residual(out)
    if residual is None:
        return "the output projection does not feed a residual Add"
    width = q.weight.shape[1]
    if k.weight.shape[1] != width or v.weight.shape[1] != width or out.weight.shape[0] != width:
        return "Q/K/V/output widths differ"
    split = q_reshapes + k_reshapes + v_reshapes
    if len(split) != 3:
        return "expected one head-split Reshape on each of Q, K and V"
    heads = dims = None
    for reshape in split:
        entries = reshape_entries(reshape)
        if entries is None or len(entries) != 4:
            return "a head-split Reshape whose target shape is not [batch, seq, heads, head_dim]"
        h, d = entries[2][0], entries[3][0]
        if h is None and d is None:
            return "a head-split Reshape with neither heads nor head_dim constant"
        if d is not None and d > 0:
            dims = d
        if h is not None and h > 0:
            heads = h
    if dims is None and heads is not None:
        dims = width // heads
    if dims is None or width % dims:
        return "cannot read head_dim from the head-split Reshapes"
    heads = width // dims
    return AttentionBlock(
        num_heads=heads,
        head_dim=dims,
        out=out,
        residual=residual,
        q=q,
        k=k,
        v=v,
        split_reshapes=split,
        merge_reshape=merge,
        score_biases=score_biases,
    )


def _fused_attention(node: ir.Node) -> AttentionBlock | str:
    heads = node.attributes.get("num_heads")
    weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if heads is None or weight is None or weight.ndim != 2:
        return "a fused Attention without constant packed weights or num_heads"
    if "qkv_hidden_sizes" in node.attributes:
        sizes = list(node.attributes["qkv_hidden_sizes"].as_ints())
        if len(set(sizes)) != 1:
            return "a fused Attention with unequal Q/K/V sizes"
    num_heads = int(heads.as_int())
    width = weight.shape[1] // 3
    if weight.shape[1] % 3 or width % num_heads:
        return "a fused Attention whose packed width is not 3 x heads x head_dim"
    if any(len(node.inputs) > i and node.inputs[i] is not None for i in (4, 6, 7)):
        return "a fused Attention with past state (decoder), which is not supported"
    out = _as_linear(_single_consumer(node.outputs[0]))
    if out is None or out.weight.shape[0] != width:
        return "a fused Attention not followed by its output projection"
    residual = _residual(out)
    if residual is None:
        return "a fused Attention whose output projection does not feed a residual"
    return AttentionBlock(
        num_heads=num_heads, head_dim=width // num_heads, out=out, residual=residual, fused=node
    )


# -- feed-forward --------------------------------------------------------------------------------
def _ffn(down_node: ir.Node) -> FFNBlock | str:
    down = _as_linear(down_node)
    if down is None:
        return "not a MatMul with constant weight"
    size, out_dim = down.weight.shape
    up: ir.Node | None = None
    region: dict[ir.Node, None] = {}
    consts: list[tuple[ir.Node, int]] = []
    stack = [down.input]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            return "a graph input inside the region"
        if node in region:
            continue
        if node.op_type == "MatMul":
            weight = const_array(node.inputs[1])
            if (
                weight is None
                or weight.ndim != 2
                or weight.shape[1] != size
                or (up is not None and up is not node)
            ):
                return "a MatMul that is not the up-projection"
            up = node
            continue
        if node.op_type not in ELEMENTWISE:
            return f"{node.op_type} between the projections"
        region[node] = None
        for index, inp in enumerate(node.inputs):
            if inp is None:
                continue
            arr = const_array(inp)
            if arr is not None:
                if arr.size == 1:
                    continue
                if arr.size == size and arr.shape[-1] == size:
                    consts.append((node, index))
                    continue
                return "a constant that is neither scalar nor per-neuron"
            stack.append(inp)
    if up is None:
        return "no up-projection"
    allowed = set(region) | {down_node}
    for node in [up, *region]:
        for output in node.outputs:
            if output.is_graph_output() or any(c not in allowed for c in output.consumers()):
                return "an intermediate value used outside the feed-forward block"
    up_weight = const_array(up.inputs[1])
    assert up_weight is not None
    if up_weight.shape[0] != out_dim:
        return "input and output widths differ"
    residual = _residual(down)
    if residual is None:
        return "the down-projection does not feed a residual"
    ordered = [n for n in region]
    return FFNBlock(size=size, up=up, down=down, residual=residual, region=ordered, channel_consts=consts)


# -- entry point ---------------------------------------------------------------------------------
LOOKED_FOR = (
    "attention blocks (Q/K/V MatMuls split into heads by Reshape/Transpose, MatMul-Softmax-MatMul, "
    "an output projection into a residual Add, or com.microsoft.Attention) and feed-forward blocks "
    "(MatMul [d,f] -> activation -> MatMul [f,d] into a residual)"
)


def find_blocks(graph: ir.Graph) -> EncoderLayout:
    """Recognise the encoder layers of ``graph``; refuse clearly when there are none."""
    order = {node: i for i, node in enumerate(graph)}
    attentions: list[AttentionBlock] = []
    ffns: list[FFNBlock] = []
    reasons: dict[str, int] = {}
    for node in graph:
        found: AttentionBlock | FFNBlock | str | None = None
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            found = _unfused_attention(node)
        elif _is_ms(node, "Attention"):
            found = _fused_attention(node)
        elif (
            node.op_type == "MatMul"
            and node.domain in ("", "ai.onnx")
            and const_array(node.inputs[1]) is not None
        ):
            found = _ffn(node)
            if isinstance(found, str):
                logger.debug("MatMul %s is not a feed-forward down-projection: %s", node.name, found)
                continue
        if isinstance(found, AttentionBlock):
            attentions.append(found)
        elif isinstance(found, FFNBlock):
            ffns.append(found)
        elif isinstance(found, str):
            reasons[found] = reasons.get(found, 0) + 1
            logger.debug("%s %s is not an attention block: %s", node.op_type, node.name, found)
    # The attention's output projection must not be mistaken for a feed-forward down-projection.
    out_nodes = {a.out.matmul for a in attentions}
    ffns = [f for f in ffns if f.down.matmul not in out_nodes and f.up not in out_nodes]
    if not attentions and not ffns:
        why = f" (closest misses: {'; '.join(sorted(reasons))})" if reasons else ""
        raise UserError(
            f"no Transformer encoder blocks recognised in the graph; looked for {LOOKED_FOR}{why}"
        )
    if len(attentions) != len(ffns):
        raise UserError(
            f"found {len(attentions)} attention blocks but {len(ffns)} feed-forward blocks; pruning needs "
            f"one of each per layer (looked for {LOOKED_FOR})"
        )
    attentions.sort(key=lambda a: order[a.out.matmul])
    ffns.sort(key=lambda f: order[f.down.matmul])
    hidden = int(attentions[0].out.weight.shape[1])
    layers = []
    for i, (attn, ffn) in enumerate(zip(attentions, ffns, strict=True)):
        if order[ffn.up] < order[attn.out.matmul]:
            raise UserError(
                f"layer {i}: the feed-forward block comes before the attention block; unsupported layout"
            )
        layers.append(Layer(i, attn, ffn))
    layout = EncoderLayout(
        layers=layers, hidden_size=hidden, fused=any(a.fused is not None for a in attentions)
    )
    logger.info("found %s", layout.describe())
    return layout
