"""Decoder fusion: a causal LM's exported graph rewritten to onnxruntime's CPU kernels.

What is rewritten, and by whose rules:

- **RMSNorm -> SimplifiedLayerNormalization** (Llama, Mistral, Qwen2/3): a rule of ours
  (:class:`RmsNormOpset17`), the opset-17 form of onnxscript's ``RmsNormFusion``: the exporter
  writes ``ReduceMean`` with an ``axes`` attribute and ``1 / Sqrt`` as a ``Div``, where
  onnxscript's rule wants ``axes`` as an input (opset 18) and ``Reciprocal``.
- **residual Add + norm -> SkipSimplifiedLayerNormalization / SkipLayerNormalization**: onnxscript's
  own ``ort_fusions`` rules (``fuse_skip_rms_normalization``, ``fuse_skip_layer_normalization``).
- **attention -> GroupQueryAttention** (every family; GPT-2 with as many KV heads as query heads):
  written here (:func:`fuse_group_query_attention`), because the exporter spells attention out
  itself (``exporters/decoder_module.py``: cache Concat, repeat of the KV heads, scaled scores plus
  an additive bias, Softmax): each layer is found from its Softmax and its two ``present.N``
  Concats. The bias the graph already computes (causal, padding, Mistral's window) becomes
  GroupQueryAttention's ``attention_bias``, and every row's ``seqlens_k`` is the full length
  minus one, so left-padded batches keep their meaning; the cache contract stays (past and
  present in BNSH). Where the head size is a multiple of 16, the kernel rotates queries and keys
  itself (``do_rotary``, by cache slot: see :func:`fuse_group_query_attention`) and reads q, k, v
  as one packed MatMul; else the queries and keys arrive rotated by RotaryEmbedding nodes.
- **the attention output's residual Add + norm**: onnxscript's skip rules again, once attention is
  one node and :func:`residual_shapes` has given the residual stream its shapes.

The pass checks its own output: on held-out prompts, the float graph's greedy continuation fed to
both graphs must give the same top token at every position (``token_agreement`` 1.0), else
nothing is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)
from onnxscript import optimizer as onnxscript_optimizer
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    fuse_skip_rms_normalization,
)
from onnxscript.rewriter.rules.common import no_op_cast_rule
from pydantic import Field

from trimformer.errors import ParityError, UserError
from trimformer.formats.decoder import (
    CACHE_IN_PLACE_KEY,
    DecoderSpec,
    present_key_name,
    present_value_name,
)
from trimformer.formats.targets import MS_DOMAIN
from trimformer.passes.base import PassConfig, PassContext, PassReport, register_pass
from trimformer.passes.graph import const_array
from trimformer.runtime.decoding import CachedSession, fidelity
from trimformer.runtime.session import cpu_session

__all__ = ["DecoderFuseConfig", "DecoderFusePass", "RmsNormOpset17", "fuse_group_query_attention"]


class DecoderFuseConfig(PassConfig):
    """``trimformer fuse`` on a causal LM; the recipe's ``[passes.fuse-decoder]``."""

    attention: bool = True
    norms: bool = True
    rotary: bool = True
    new_tokens: int = Field(default=32, ge=1, le=256, description="in [1, 256]")


class RmsNormOpset17(RewriteRuleClassBase):
    """``weight * (x / sqrt(mean(x^2) + eps))`` as the opset-17 TorchScript export writes it."""

    def pattern(self, op: Any, x: Any, scale: Any, epsilon: Any) -> Any:  # type: ignore[override]
        # The export's float-to-float Casts around it are gone by now (fuse_decoder removes them).
        mean_square = op.ReduceMean(op.Pow(x, 2.0), axes=[-1], keepdims=1)
        reciprocal = op.Div(1.0, op.Sqrt(op.Add(mean_square, epsilon)))
        return op.Mul(scale, op.Mul(x, reciprocal))

    def check(self, context: Any, x: ir.Value, scale: ir.Value, epsilon: ir.Value, **_: Any) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        eps = const_array(epsilon)
        if eps is None or eps.size != 1:
            return result.fail("epsilon is not a constant scalar", epsilon)
        if x.dtype != ir.DataType.FLOAT or const_array(scale) is None:
            return result.fail("input is not float or the scale is not a constant", x)
        return result

    def rewrite(self, op: Any, x: ir.Value, scale: ir.Value, epsilon: ir.Value, **_: Any) -> Any:  # type: ignore[override]
        eps = float(np.asarray(const_array(epsilon)).reshape(-1)[0])
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=eps, stash_type=1)


rms_norm_rules = RewriteRuleSet([RmsNormOpset17.rule()])


@dataclass
class _Site:
    """One layer's attention as exported, and what GroupQueryAttention replaces."""

    query: ir.Value  # BNSH, rotated
    key_concat: ir.Node  # Concat(past key, new key) -> present.N.key
    value_concat: ir.Node
    bias: ir.Value
    scale: float
    merged: ir.Value  # [batch, sequence, heads * head_dim], what o_proj reads
    anchor: ir.Node  # the node that writes ``merged``


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type in op_types else None


def _skip_casts(value: ir.Value) -> ir.Value:
    while (cast := _producer(value, "Cast")) is not None:
        value = cast.inputs[0]  # type: ignore[assignment]
    return value


def _concat_behind(value: ir.Value | None) -> ir.Node | None:
    """The cache Concat behind a (possibly head-repeated) key or value."""
    for _ in range(6):
        node = _producer(value, "Concat", "Reshape", "Expand", "Unsqueeze")
        if node is None:
            return None
        if node.op_type == "Concat" and len(node.inputs) == 2:
            return node
        value = node.inputs[0]
    return None


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one consumer of ``value`` besides Shape nodes (the export reads shapes everywhere),
    if it is an ``op_type``."""
    users = [u.node for u in value.uses() if u.node.op_type != "Shape"]
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _scores_site(softmax: ir.Node) -> tuple[ir.Value, ir.Node, ir.Value, float] | None:
    """(query, key Concat, bias, scale) of ``Softmax(MatMul(q, Transpose(k)) * scale + bias)``."""
    add = _producer(_skip_casts(softmax.inputs[0]), "Add")  # type: ignore[arg-type]
    if add is None:
        return None
    for scaled, bias in (add.inputs, add.inputs[::-1]):
        mul = _producer(scaled, "Mul")
        if mul is None:
            continue
        for product, factor in (mul.inputs, mul.inputs[::-1]):
            matmul, scale = _producer(product, "MatMul"), const_array(factor)
            if matmul is None or scale is None or scale.size != 1:
                continue
            transpose = _producer(matmul.inputs[1], "Transpose")
            key = None if transpose is None else _concat_behind(transpose.inputs[0])
            if key is not None and bias is not None:
                return matmul.inputs[0], key, bias, float(scale.reshape(-1)[0])  # type: ignore[return-value]
    return None


def _site(softmax: ir.Node) -> _Site | None:
    scores = _scores_site(softmax)
    if scores is None:
        return None
    query, key_concat, bias, scale = scores
    probs = softmax.outputs[0]
    while (cast := _only_consumer(probs, "Cast")) is not None:
        probs = cast.outputs[0]
    context = _only_consumer(probs, "MatMul")
    value_concat = None if context is None else _concat_behind(context.inputs[1])
    transpose = None if context is None else _only_consumer(context.outputs[0], "Transpose")
    reshape = None if transpose is None else _only_consumer(transpose.outputs[0], "Reshape")
    if value_concat is None or reshape is None:
        return None
    return _Site(query, key_concat, value_concat, bias, scale, reshape.outputs[0], reshape)


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def _lengths(graph: ir.Graph, tape: ir.tape.Tape) -> tuple[ir.Value, ir.Value]:
    """``seqlens_k`` [batch] (every row's full length minus one: padding is in the bias) and
    ``total_sequence_length`` (a scalar), both int32, from the attention mask's shape."""
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    shape = tape.op("Shape", [mask])
    length = tape.op("Gather", [shape, _constant(graph, "gqa/one", np.array(1, np.int64))])
    total = tape.op("Cast", [length], attributes={"to": ir.DataType.INT32})
    zero, one = (
        _constant(graph, f"gqa/{n}", np.array([i], np.int64)) for n, i in (("start", 0), ("stop", 1))
    )
    batch = tape.op("Slice", [shape, zero, one])
    last = tape.op("Sub", [total, _constant(graph, "gqa/one_i32", np.array(1, np.int32))])
    return tape.op("Expand", [last, batch]), total


def _split_from(bnsh: ir.Value | None) -> ir.Value | None:
    """The [batch, sequence, heads * head_dim] projection behind ``Transpose(Reshape(x))`` (the
    export's split into heads), if that is what made ``bnsh``."""
    transpose = _producer(bnsh, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    source = None if reshape is None else reshape.inputs[0]
    return source if source is not None and source.shape is not None and source.shape.rank() == 3 else None


def _projection_behind(bnsh: ir.Value | None) -> tuple[ir.Value, tuple[ir.Value, ...]] | None:
    """The [batch, sequence, heads * head_dim] projection behind a query, key or value in BNSH, and
    the rotation applied to it (RotaryEmbedding's position_ids, cos and sin tables; empty if none)."""
    if (source := _split_from(bnsh)) is not None:
        return source, ()
    rotary = _producer(bnsh, "RotaryEmbedding")
    if rotary is None or rotary.domain != MS_DOMAIN:
        return None
    source = _split_from(rotary.inputs[0])
    return None if source is None else (source, tuple(rotary.inputs[1:4]))  # type: ignore[arg-type]


def _linear(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(input, weight [K, N], bias [N] or None) of ``MatMul(x, W)`` or ``MatMul(x, W) + b``."""
    bias, add = None, _producer(value, "Add")
    if add is not None:
        for product, constant in (add.inputs, add.inputs[::-1]):
            if (bias := const_array(constant)) is not None and bias.ndim == 1:
                value = product  # type: ignore[assignment]
                break
        else:
            return None
    matmul = _producer(value, "MatMul")
    weight = None if matmul is None else const_array(matmul.inputs[1])
    if matmul is None or weight is None or weight.ndim != 2:
        return None
    return matmul.inputs[0], weight, bias  # type: ignore[return-value]


def _packed_qkv(
    graph: ir.Graph, tape: ir.tape.Tape, projections: list[ir.Value], layer: int
) -> ir.Value | None:
    """The query, key and value projections of one input as one MatMul (and one bias Add), the
    packed QKV GroupQueryAttention reads when key and value are absent: one weight read per token
    instead of three (None: they do not share an input, or not all have a bias)."""
    linear = [_linear(value) for value in projections]
    if any(part is None for part in linear) or len({part[0] for part in linear}) != 1:  # type: ignore[index]
        return None
    biases = [part[2] for part in linear]  # type: ignore[index]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    weight = np.concatenate([part[1] for part in linear], axis=1)  # type: ignore[index]
    packed = tape.op("MatMul", [linear[0][0], _constant(graph, f"gqa/qkv_weight_{layer}", weight)])  # type: ignore[index]
    if biases[0] is not None:
        bias: np.ndarray = np.concatenate(biases)  # type: ignore[arg-type]
        packed = tape.op("Add", [packed, _constant(graph, f"gqa/qkv_bias_{layer}", bias)])
    return packed


def _attention_inputs(
    graph: ir.Graph, tape: ir.tape.Tape, site: _Site, spec: DecoderSpec, layer: int
) -> tuple[list[ir.Value | None], tuple[ir.Value, ...]]:
    """GroupQueryAttention's query, key and value (key and value None: packed in the query) and the
    rotation it applies itself (position_ids, cos, sin; empty: the inputs arrive rotated or
    unrotated as exported). The kernel rotates and packs where every part allows it."""
    bnsh = [site.query, site.key_concat.inputs[1], site.value_concat.inputs[1]]
    behind = [_projection_behind(value) for value in bnsh]
    rotations = {parts[1] for parts in behind[:2] if parts is not None}
    # The kernel's own rotation needs a head size in whole 16-float vectors.
    rotates = rotations != {()} and spec.head_dim % 16 == 0
    if all(behind) and len(rotations) == 1 and not behind[2][1] and (rotates or rotations == {()}):  # type: ignore[index]
        projections = [parts[0] for parts in behind]  # type: ignore[index]
        rotation = rotations.pop()
        packed = _packed_qkv(graph, tape, projections, layer)
        return ([packed, None, None] if packed is not None else projections), rotation  # type: ignore[return-value]
    bsd = _constant(graph, f"gqa/bsd_shape_{layer}", np.array([0, 0, -1], np.int64))
    heads = (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads)
    return [_to_bsd(tape, value, bsd, n) for value, n in zip(bnsh, heads, strict=True)], ()  # type: ignore[arg-type]


def _to_bsd(tape: ir.tape.Tape, bnsh: ir.Value, shape: ir.Value, heads: int) -> ir.Value:
    """[batch, heads, sequence, head_dim] as [batch, sequence, heads * head_dim], what
    GroupQueryAttention reads: the projection itself where the export only split it into heads
    (a rotation moves onto the projection, RotaryEmbedding reading 3-D input), else a Transpose
    and a Reshape."""
    if (source := _split_from(bnsh)) is not None:
        return source
    rotary = _producer(bnsh, "RotaryEmbedding")
    rotated = None if rotary is None or rotary.domain != MS_DOMAIN else rotary.inputs[0]
    if rotary is not None and rotated is not None and (source := _split_from(rotated)) is not None:
        inputs = [source, *rotary.inputs[1:]]
        return tape.op(
            "RotaryEmbedding", inputs, attributes={"interleaved": 0, "num_heads": heads}, domain=MS_DOMAIN
        )
    bsnh = tape.op("Transpose", [bnsh], attributes={"perm": [0, 2, 1, 3]})
    return tape.op("Reshape", [bsnh, shape])


def _rename_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    index = next(i for i, v in enumerate(graph.outputs) if v is old)
    name = old.name
    old.name = f"{name}/replaced"
    new.name, new.type, new.shape = name, old.type, old.shape  # the contract's dtype and dynamic axes
    graph.outputs[index] = new


def fuse_group_query_attention(model: ir.Model, spec: DecoderSpec) -> int:
    """Each layer's exported attention as one GroupQueryAttention; the number rewritten."""
    graph = model.graph
    sites = [s for node in list(graph) if node.op_type == "Softmax" and (s := _site(node)) is not None]
    if not sites:
        return 0
    lengths_tape = ir.tape.Tape()
    seqlens, total = _lengths(graph, lengths_tape)
    graph.insert_before(next(iter(graph)), lengths_tape.nodes)
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    attributes = {"num_heads": spec.num_heads, "kv_num_heads": spec.num_kv_heads}
    for layer, site in enumerate(sites):
        tape = ir.tape.Tape()
        qkv, rotation = _attention_inputs(graph, tape, site, spec, layer)
        # The kernel rotates by cache slot (its own positions: a row's past length plus the token's
        # index), not by the graph's position_ids, which it reads only from a prompt's first
        # token. Rotation angles enter attention as differences, and slot differences equal
        # position differences within a row, left padding included: the same attention.
        _, cos, sin = rotation or (None, None, None)
        gqa = tape.op_multi_out(
            "GroupQueryAttention",
            [
                *qkv,
                site.key_concat.inputs[0],
                site.value_concat.inputs[0],
                seqlens,
                total,
                cos,
                sin,
                None,
                site.bias,
            ],
            attributes={**attributes, "scale": site.scale, "do_rotary": int(bool(rotation))},
            domain=MS_DOMAIN,
            num_outputs=3,
        )
        graph.insert_before(site.anchor, tape.nodes)
        gqa[0].type = site.merged.type
        gqa[0].shape = ir.Shape([*ids.shape, spec.num_heads * spec.head_dim])  # type: ignore[misc]
        site.merged.replace_all_uses_with(gqa[0])
        _rename_output(graph, site.key_concat.outputs[0], gqa[1])
        _rename_output(graph, site.value_concat.outputs[0], gqa[2])
        assert gqa[1].name == present_key_name(layer) and gqa[2].name == present_value_name(layer)
    RemoveUnusedNodesPass()(model)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return len(sites)


def fold_static_dims(model: ir.Model) -> int:
    """``Gather(Shape(x), k)`` where dimension k of x is known becomes that number, so the
    rotate-half slices (split at ``head_dim / 2``, computed from the shape) fold to constants."""
    count = 0
    for node in list(model.graph):
        shape_node = node.inputs[0].producer() if node.op_type == "Gather" and node.inputs[0] else None
        if shape_node is None or shape_node.op_type != "Shape" or "start" in shape_node.attributes:
            continue
        index, source = const_array(node.inputs[1]), shape_node.inputs[0]
        if index is None or index.ndim != 0 or source is None or source.shape is None:
            continue
        dim = source.shape[int(index)]
        if isinstance(dim, int):
            name = f"{node.outputs[0].name}/static"
            node.outputs[0].replace_all_uses_with(_constant(model.graph, name, np.array(dim, np.int64)))
            count += 1
    return count


def _rotary_tables(cos: ir.Value, context: int) -> tuple[np.ndarray, np.ndarray, ir.Value] | None:
    """(cos_cache, sin_cache [context, head_dim / 2], position_ids) behind a rotation's cos input:
    ``Unsqueeze(Cos(Concat(f, f)) [* scale])`` with ``f = Cast(Unsqueeze(position_ids)) * inv_freq``."""
    node = _producer(cos, "Unsqueeze")
    value = None if node is None else _skip_casts(node.inputs[0])  # type: ignore[arg-type]
    scale, mul = 1.0, _producer(value, "Mul")
    if mul is not None:
        factor = next((const_array(v) for v in mul.inputs if const_array(v) is not None), None)
        if factor is None or factor.size != 1:
            return None
        scale = float(factor.reshape(-1)[0])
        value = next(v for v in mul.inputs if const_array(v) is None)
    cos_node = _producer(value, "Cos")
    concat = None if cos_node is None else _producer(cos_node.inputs[0], "Concat")
    freqs = (
        None
        if concat is None or concat.inputs[0] is not concat.inputs[1]
        else _producer(concat.inputs[0], "Mul")
    )
    if freqs is None:
        return None
    inv_freq = next((const_array(v) for v in freqs.inputs if const_array(v) is not None), None)
    positions = next((v for v in freqs.inputs if const_array(v) is None), None)
    while positions is not None and (p := _producer(positions, "Cast", "Unsqueeze")) is not None:
        positions = p.inputs[0]
    if inv_freq is None or positions is None or positions.name != "position_ids":
        return None
    angles = np.arange(context, dtype=np.float64)[:, None] * inv_freq.reshape(1, -1).astype(np.float64)
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32), positions


def fuse_rotary(model: ir.Model, spec: DecoderSpec) -> int:
    """Rotations as onnxruntime's RotaryEmbedding with cos/sin tables over the model's context.

    onnxscript's ``fuse_rotary_embedding`` finds ``x * cos + rotate_half(x) * sin`` and writes an
    intermediate op that takes cos and sin; we replace it with the kernel, whose tables we compute
    from the graph's own ``inv_freq`` and scale (its ``cos_sin_cache`` rule expects the MatMul form
    of the frequencies, the export writes a broadcast Mul)."""
    fold_static_dims(model)
    onnxscript_optimizer.optimize(model)
    if not fuse_rotary_embedding(model):
        return 0
    count = 0
    tables: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for node in [n for n in model.graph if n.op_type == "RotaryEmbedding" and n.domain != MS_DOMAIN]:
        x, cos, _sin = node.inputs
        found = _rotary_tables(cos, spec.context_length)  # type: ignore[arg-type]
        if found is None:
            raise ParityError(
                "a rotation's cos/sin could not be read back as tables; fuse with rotary = false"
            )
        key = id(cos.producer())  # type: ignore[union-attr]
        if key not in tables:
            cos_t, sin_t, positions = found
            tables[key] = (
                _constant(model.graph, f"rotary/cos_cache_{len(tables)}", cos_t),
                _constant(model.graph, f"rotary/sin_cache_{len(tables)}", sin_t),
                positions,
            )
        cos_cache, sin_cache, positions = tables[key]
        fused = ir.Node(
            MS_DOMAIN,
            "RotaryEmbedding",
            [x, positions, cos_cache, sin_cache],
            attributes=[ir.AttrInt64("interleaved", 0)],
        )
        model.graph.insert_before(node, fused)
        fused.outputs[0].type, fused.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
        node.outputs[0].replace_all_uses_with(fused.outputs[0])
        model.graph.remove(node, safe=True)
        count += 1
    return count


# onnxruntime's ops whose first output (and a skip norm's residual sum, output 3) has the shape of
# their first input.
_SHAPE_OF_INPUT = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization"}
_SHAPE_OF_INPUT |= {"SkipLayerNormalization", "RotaryEmbedding", "Sigmoid", "Gelu", "FastGelu", "Tanh"}


def residual_shapes(model: ir.Model) -> None:
    """The [batch, sequence, hidden] shapes of the residual stream, set in graph order from the
    attention outputs on: onnx's shape inference stops at onnxruntime's ops, and the export's
    dynamic reshapes leave unrelated symbolic dims, where onnxscript's skip-norm rules want the
    residual Add's two inputs to share theirs."""
    for node in model.graph:
        first = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        shape = None
        if node.op_type in _SHAPE_OF_INPUT:
            shape = first
        elif node.op_type in ("Add", "Mul", "Sub") and len(node.inputs) == 2 and first is not None:
            other = node.inputs[1].shape  # type: ignore[union-attr]
            rank_one = other is not None and other.rank() == 1 and other[0] == first[-1]
            shape = first if other == first or rank_one else None
        elif node.op_type == "MatMul" and first is not None and first.rank() == 3:
            weight = const_array(node.inputs[1])
            shape = None if weight is None or weight.ndim != 2 else ir.Shape([*first[:-1], weight.shape[1]])
        if shape is None:
            continue
        for index, value in enumerate(node.outputs):
            if index in (0, 3) or node.op_type not in _SHAPE_OF_INPUT:
                value.shape = shape
                value.type = value.type or node.inputs[0].type  # type: ignore[union-attr]


def fuse_decoder(model: ir.Model, spec: DecoderSpec, config: DecoderFuseConfig) -> dict[str, int]:
    """Every fusion in place on ``model``; the count of each."""
    counts: dict[str, int] = {}
    # The exporter writes scalars (exponents, epsilons, scales) as Constant nodes; the rewriter
    # matches constants by value, which initializers carry.
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=1)(model)
    ShapeInferencePass()(model)  # the rules check dtypes and shapes
    if config.norms:
        # The export's float-to-float Casts sit between the residual Add and its norm.
        RewriteRuleSet([no_op_cast_rule]).apply_to_model(model)
        IdentityEliminationPass()(model)
        counts["simplified_layer_norm"] = rms_norm_rules.apply_to_model(model)
        ShapeInferencePass()(model)
        counts["skip_simplified_layer_norm"] = fuse_skip_rms_normalization(model)
        counts["skip_layer_norm"] = fuse_skip_layer_normalization(model)
    if config.rotary:
        counts["rotary_embedding"] = fuse_rotary(model, spec)
    if config.attention:
        counts["group_query_attention"] = fuse_group_query_attention(model, spec)
    if config.norms and counts.get("group_query_attention"):
        # The attention output's residual Add: its shapes are known once attention is one node.
        residual_shapes(model)
        counts["skip_simplified_layer_norm"] += fuse_skip_rms_normalization(model)
        counts["skip_layer_norm"] += fuse_skip_layer_normalization(model)
    attention = [node for node in model.graph if node.op_type == "GroupQueryAttention"]
    counts["packed_qkv"] = sum(node.inputs[1] is None for node in attention)
    counts["rotary_in_attention"] = sum(node.attributes.get_int("do_rotary", 0) for node in attention)
    RemoveUnusedNodesPass()(model)
    return counts


@register_pass("fuse-decoder", DecoderFuseConfig, order=1, data=(), emits=(MS_DOMAIN,), models="decoder")
def make_decoder_fuse_pass(config: DecoderFuseConfig, ctx: PassContext) -> DecoderFusePass:
    return DecoderFusePass(config, ctx)


class DecoderFusePass(FunctionalPass):
    def __init__(self, config: DecoderFuseConfig, ctx: PassContext) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    def call(self, model: ir.Model) -> PassReport:
        started = time.perf_counter()
        spec, prompts = self.ctx.decoder_spec, self.ctx.prompts
        if spec is None or not prompts:
            raise UserError("decoder fusion checks greedy tokens: it needs the decoder spec and prompts")
        reference = ir.to_proto(model)
        fused = ir.from_proto(reference)
        counts = fuse_decoder(fused, spec, self.config)
        proto = ir.to_proto(fused)
        parity = fidelity(
            CachedSession(cpu_session(proto), spec),
            CachedSession(cpu_session(reference), spec),
            prompts,
            self.config.new_tokens,
        )
        if parity["token_agreement"] < 1.0:
            raise ParityError(
                f"the fused decoder graph changes greedy tokens (agreement {parity['token_agreement']:.4f} "
                f"with the exported graph over {parity['tokens']} tokens); fuse with attention, rotary or norms = false"
            )
        stats = {
            "fusions": counts,
            "parity": {**parity, "prompts": len(prompts)},
            "seconds": round(time.perf_counter() - started, 2),
        }
        return PassReport(fused, any(counts.values()), stats=stats, extras=_cache_extras(fused))


def _cache_extras(model: ir.Model) -> dict[str, bool]:
    """Where GroupQueryAttention writes every present, sessions may keep the cache in place."""
    presents = [v for v in model.graph.outputs if v.name and v.name.startswith("present.")]
    in_place = bool(presents) and all(_producer(v, "GroupQueryAttention") for v in presents)
    return {CACHE_IN_PLACE_KEY: True} if in_place else {}
