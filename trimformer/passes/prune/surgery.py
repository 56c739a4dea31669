"""Removing heads and feed-forward neurons from a recognised encoder graph.

Each layer's edit is one coupled group (as in Torch-Pruning's dependency groups, but on ONNX):
a head takes its Q/K/V weight columns and biases, its output-projection rows, the head count in
the head-split Reshape shapes (or ``num_heads`` of a fused Attention), the merged width in the
context Reshape, and its slice of any per-head attention bias; a neuron takes its up-projection
column, its per-neuron constants (bias) and its down-projection row. Every group is checked
before anything changes, so a graph is either fully pruned or untouched.

Constants are never edited in place: a changed constant becomes a new initializer wired to that
one consumer, because exporters share identical initializers across layers.

Removing every head (or neuron) of a layer removes the branch: the residual join becomes
``stream + branch bias``, exactly what the branch computes when all its heads are masked.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from trimformer.errors import UserError
from trimformer.passes.graph import (
    MS_DOMAIN,
    AttentionBlock,
    EncoderLayout,
    FFNBlock,
    Linear,
    Residual,
    const_array,
    reshape_entries,
)

__all__ = ["LayerPlan", "apply_plan", "check_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """Indices (into the graph's current heads/neurons) to keep in one layer, ascending."""

    kept_heads: tuple[int, ...]
    kept_neurons: tuple[int, ...]


class _Editor:
    """Copy-on-write constant edits and node insertion on one graph."""

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self._counter = itertools.count()
        self._names = {v.name for v in graph.initializers.values()}

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{hint}_pruned_{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    def constant(self, array: np.ndarray, hint: str) -> ir.Value:
        name = self.fresh(hint)
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        value.shape = ir.Shape(array.shape)
        value.dtype = ir.DataType.from_numpy(array.dtype)
        self.graph.register_initializer(value)
        return value

    def set_input(self, node: ir.Node, index: int, array: np.ndarray, hint: str) -> None:
        node.replace_input_with(index, self.constant(array, hint))


def _hint(node: ir.Node) -> str:
    return (node.name or node.op_type).strip("/").replace("/", "_")


def _head_columns(heads: tuple[int, ...], head_dim: int) -> np.ndarray:
    return np.asarray([h * head_dim + j for h in heads for j in range(head_dim)], dtype=np.int64)


# -- checks --------------------------------------------------------------------------------------
def _check_attention(block: AttentionBlock, kept: tuple[int, ...], layer: int) -> None:
    if len(set(kept)) != len(kept) or any(not 0 <= h < block.num_heads for h in kept):
        raise UserError(
            f"layer {layer}: head indices {list(kept)} are not distinct heads of 0..{block.num_heads - 1}"
        )
    if not kept:
        _check_branch_removable(block.residual, block.out, layer, "attention")
        return
    if block.fused is not None:
        return
    for reshape in block.split_reshapes:
        entries = reshape_entries(reshape)
        if entries is None or len(entries) != 4 or entries[2][0] is None:
            raise UserError(f"layer {layer}: a head-split Reshape has a computed head count; cannot prune it")
    for node, index in block.score_biases:
        value = node.inputs[index]
        arr = const_array(value)
        shape = arr.shape if arr is not None else (value.shape if value is not None else None)
        if shape is None and block.num_heads > 1:
            raise UserError(f"layer {layer}: an attention bias of unknown shape; run shape inference first")


def _check_ffn(block: FFNBlock, kept: tuple[int, ...], layer: int) -> None:
    if len(set(kept)) != len(kept) or any(not 0 <= n < block.size for n in kept):
        raise UserError(f"layer {layer}: neuron indices are not distinct neurons of 0..{block.size - 1}")
    if not kept:
        _check_branch_removable(block.residual, block.down, layer, "feed-forward")


def _check_branch_removable(residual: Residual, linear: Linear, layer: int, what: str) -> None:
    node = residual.node
    if node.op_type == "Add":
        if linear.bias_add is None and node.outputs[0].is_graph_output():
            raise UserError(
                f"layer {layer}: cannot remove the whole {what} branch (its sum is a graph output)"
            )
        return
    # SkipLayerNormalization: only its normalised output and the optional sum may be in use.
    for i, out in enumerate(node.outputs):
        if i in (1, 2) and (out.consumers() or out.is_graph_output()):
            raise UserError(f"layer {layer}: SkipLayerNormalization's mean/variance outputs are used")
        if out.is_graph_output():
            raise UserError(f"layer {layer}: cannot remove the whole {what} branch (it feeds a graph output)")


def check_plan(layout: EncoderLayout, plan: list[LayerPlan], opset: int) -> None:
    """Validate every group before any edit."""
    if len(plan) != len(layout.layers):
        raise UserError(f"the plan has {len(plan)} layers, the graph {len(layout.layers)}")
    for layer, step in zip(layout.layers, plan, strict=True):
        _check_attention(layer.attention, step.kept_heads, layer.index)
        _check_ffn(layer.ffn, step.kept_neurons, layer.index)
        fused_residual = any(
            r.node.domain == MS_DOMAIN for r in (layer.attention.residual, layer.ffn.residual)
        )
        if fused_residual and opset < 17 and not (step.kept_heads and step.kept_neurons):
            raise UserError(
                f"layer {layer.index}: removing a fused branch needs opset 17 (LayerNormalization)"
            )


# -- edits ---------------------------------------------------------------------------------------
def _slice_linear_columns(ed: _Editor, linear: Linear, cols: np.ndarray) -> None:
    ed.set_input(linear.matmul, 1, linear.weight[:, cols], _hint(linear.matmul) + "_w")
    bias = linear.bias
    if bias is not None and linear.bias_add is not None:
        ed.set_input(linear.bias_add, linear.bias_index, bias[cols], _hint(linear.bias_add) + "_b")


def _slice_rows(ed: _Editor, linear: Linear, rows: np.ndarray) -> None:
    ed.set_input(linear.matmul, 1, linear.weight[rows, :], _hint(linear.matmul) + "_w")


def _set_reshape_entry(ed: _Editor, reshape: ir.Node, position: int, new: int) -> None:
    entries = reshape_entries(reshape)
    assert entries is not None
    _, source, offset = entries[position]
    shape_value = reshape.inputs[1]
    assert shape_value is not None
    if source is shape_value:
        arr = np.array(const_array(shape_value), copy=True)
        arr.reshape(-1)[offset] = new
        ed.set_input(reshape, 1, arr, _hint(reshape) + "_shape")
        return
    # A Concat of parts: clone it for this Reshape alone (it may be shared with other layers).
    concat = shape_value.producer()
    assert concat is not None
    inputs = list(concat.inputs)
    part_index = next(i for i, v in enumerate(inputs) if v is source)
    arr = np.array(const_array(source), copy=True)
    arr.reshape(-1)[offset] = new
    inputs[part_index] = ed.constant(arr, _hint(concat) + "_part")
    clone = ir.Node(
        "", "Concat", inputs, attributes=list(concat.attributes.values()), name=ed.fresh(_hint(concat))
    )
    ed.graph.insert_before(reshape, clone)
    reshape.replace_input_with(1, clone.outputs[0])


def _slice_head_axis(ed: _Editor, node: ir.Node, index: int, kept: tuple[int, ...], heads: int) -> None:
    """A per-head bias on the scores ([..., heads, q, k]): keep the rows of kept heads."""
    value = node.inputs[index]
    assert value is not None
    arr = const_array(value)
    if arr is not None:
        if arr.ndim >= 3 and arr.shape[-3] == heads and heads > 1:
            ed.set_input(node, index, np.take(arr, list(kept), axis=arr.ndim - 3), _hint(node) + "_bias")
        return
    shape = value.shape
    if shape is None or len(shape) < 3 or shape[len(shape) - 3] != heads or heads == 1:
        return
    indices = ed.constant(np.asarray(kept, dtype=np.int64), _hint(node) + "_heads")
    gather = ir.Node(
        "",
        "Gather",
        [value, indices],
        attributes=[ir.AttrInt64("axis", len(shape) - 3)],
        name=ed.fresh("head_gather"),
    )
    ed.graph.insert_before(node, gather)
    node.replace_input_with(index, gather.outputs[0])


def _prune_attention(ed: _Editor, block: AttentionBlock, kept: tuple[int, ...]) -> None:
    d = block.head_dim
    cols = _head_columns(kept, d)
    if block.fused is not None:
        node = block.fused
        width = block.num_heads * d
        packed = np.concatenate([cols + i * width for i in range(3)])
        weight = const_array(node.inputs[1])
        assert weight is not None
        ed.set_input(node, 1, weight[:, packed], _hint(node) + "_qkv_w")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = const_array(node.inputs[2])
            if bias is None:
                raise UserError("a fused Attention with a computed bias cannot be pruned")
            ed.set_input(node, 2, bias[packed], _hint(node) + "_qkv_b")
        node.attributes["num_heads"] = ir.AttrInt64("num_heads", len(kept))
        if "qkv_hidden_sizes" in node.attributes:
            node.attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", [len(kept) * d] * 3)
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            _slice_head_axis(ed, node, 5, kept, block.num_heads)
    else:
        for linear in (block.q, block.k, block.v):
            assert linear is not None
            _slice_linear_columns(ed, linear, cols)
        for reshape in block.split_reshapes:
            # Write the head count explicitly (instead of -1) so later fusion reads it per layer.
            _set_reshape_entry(ed, reshape, 2, len(kept))
        if block.merge_reshape is not None:
            entries = reshape_entries(block.merge_reshape)
            if entries and entries[-1][0] == block.num_heads * d:
                _set_reshape_entry(ed, block.merge_reshape, len(entries) - 1, len(kept) * d)
        for node, index in block.score_biases:
            _slice_head_axis(ed, node, index, kept, block.num_heads)
    _slice_rows(ed, block.out, cols)


def _prune_ffn(ed: _Editor, block: FFNBlock, kept: tuple[int, ...]) -> None:
    idx = np.asarray(kept, dtype=np.int64)
    weight = const_array(block.up.inputs[1])
    assert weight is not None
    ed.set_input(block.up, 1, weight[:, idx], _hint(block.up) + "_w")
    for node, index in block.channel_consts:
        arr = const_array(node.inputs[index])
        assert arr is not None
        ed.set_input(
            node, index, arr.reshape(-1)[idx].reshape((*arr.shape[:-1], len(idx))), _hint(node) + "_c"
        )
    _slice_rows(ed, block.down, idx)


def _remove_branch(
    ed: _Editor, residual: Residual, linear: Linear, renames: list[tuple[ir.Value, str]]
) -> None:
    """Replace ``stream + branch`` by ``stream + bias`` (the branch's value with every unit masked)."""
    node = residual.node
    bias = linear.bias
    if node.op_type == "Add":
        if bias is not None:
            node.replace_input_with(residual.branch_index, ed.constant(bias, _hint(node) + "_branch_bias"))
        else:
            ir.convenience.replace_all_uses_with(node.outputs[0], residual.skip)
        return
    # Fused SkipLayerNormalization(branch, stream, gamma, beta, bias) -> Add + LayerNormalization.
    total = residual.skip
    if residual.fused_bias is not None:
        add = ir.Node("", "Add", [residual.skip, residual.fused_bias], name=ed.fresh(_hint(node) + "_add"))
        ed.graph.insert_before(node, add)
        total = add.outputs[0]
    epsilon = node.attributes.get("epsilon")
    attrs = [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", epsilon.as_float() if epsilon else 1e-12)]
    inputs = [total, node.inputs[2], node.inputs[3] if len(node.inputs) > 3 else None]
    norm = ir.Node("", "LayerNormalization", inputs, attributes=attrs, name=ed.fresh(_hint(node) + "_ln"))
    ed.graph.insert_before(node, norm)
    ir.convenience.replace_all_uses_with(node.outputs[0], norm.outputs[0])
    # The replacement takes the old value's name, so later steps (reconstruction) still find it.
    renames.append((norm.outputs[0], str(node.outputs[0].name)))
    if len(node.outputs) > 3 and node.outputs[3].consumers():
        ir.convenience.replace_all_uses_with(node.outputs[3], total)


def apply_plan(model: ir.Model, layout: EncoderLayout, plan: list[LayerPlan]) -> None:
    """Apply a validated plan in place, then drop what no longer feeds an output."""
    opset = model.opset_imports.get("", 17)
    check_plan(layout, plan, opset)
    ed = _Editor(model.graph, opset)
    renames: list[tuple[ir.Value, str]] = []
    for layer, step in zip(layout.layers, plan, strict=True):
        attn, ffn = layer.attention, layer.ffn
        if len(step.kept_heads) < attn.num_heads:
            if step.kept_heads:
                _prune_attention(ed, attn, step.kept_heads)
            else:
                _remove_branch(ed, attn.residual, attn.out, renames)
        if len(step.kept_neurons) < ffn.size:
            if step.kept_neurons:
                _prune_ffn(ed, ffn, step.kept_neurons)
            else:
                _remove_branch(ed, ffn.residual, ffn.down, renames)
    RemoveUnusedNodesPass()(model)
    for value, name in renames:
        value.name = name
    _forget_shapes(model.graph)


def _forget_shapes(graph: ir.Graph) -> None:
    """Intermediate shapes recorded before the edit are stale; shape inference recomputes them."""
    keep = {*graph.inputs, *graph.outputs, *graph.initializers.values()}
    for node in graph:
        for value in node.outputs:
            if value not in keep:
                value.shape = None
