"""Where each encoder layer's six projections live in an unfused graph, read and written as
arrays: the ONNX half of block reconstruction (the torch half, which tunes them, is
:mod:`trimformer.training.block_reconstruct`; the prune stage joins the two)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from trimformer.errors import UserError
from trimformer.passes.graph import EncoderLayout, Linear, const_array, find_blocks
from trimformer.runtime.session import cpu_session

__all__ = ["PROJECTIONS", "GraphProjections", "LayerWeights"]

PROJECTIONS = ("q", "k", "v", "out", "up", "down")
# One layer's projections: name -> (weight [in, out] as the graph holds it, bias or None).
LayerWeights = dict[str, tuple[np.ndarray, np.ndarray | None]]


@dataclass
class _Slot:
    """A constant operand of one node: where a tuned array is written (as a private initializer)."""

    node: ir.Node
    index: int

    @property
    def value(self) -> ir.Value:
        value = self.node.inputs[self.index]
        assert value is not None
        return value


@dataclass
class _GraphLinear:
    weight: _Slot  # [in, out]
    bias: _Slot | None


def _up_bias(layout_layer: Any) -> _Slot | None:
    up = layout_layer.ffn.up
    for node, index in layout_layer.ffn.channel_consts:
        if node.op_type == "Add" and any(inp is up.outputs[0] for inp in node.inputs):
            return _Slot(node, index)
    return None


def _linear_slots(lin: Linear) -> _GraphLinear:
    bias = None if lin.bias_add is None else _Slot(lin.bias_add, lin.bias_index)
    return _GraphLinear(_Slot(lin.matmul, 1), bias)


def _layer_slots(layout: EncoderLayout) -> list[dict[str, _GraphLinear]]:
    if layout.fused:
        raise UserError("block reconstruction needs an unfused graph; prune before `trimformer fuse`")
    found = []
    for layer in layout.layers:
        attn = layer.attention
        entry: dict[str, _GraphLinear] = {}
        pairs = (("q", attn.q), ("k", attn.k), ("v", attn.v), ("out", attn.out), ("down", layer.ffn.down))
        for key, lin in pairs:
            if lin is None:
                raise UserError(f"layer {layer.index}: no separate {key} projection to reconstruct")
            entry[key] = _linear_slots(lin)
        entry["up"] = _GraphLinear(_Slot(layer.ffn.up, 1), _up_bias(layer))
        found.append(entry)
    return found


def _read(slot: _Slot | None) -> np.ndarray | None:
    return None if slot is None else const_array(slot.value)


def _write(graph: ir.Graph, slot: _Slot, array: np.ndarray, serial: int) -> None:
    """Point the node at a new initializer: exporters share equal constants between layers (and
    reach them through Identity nodes), so the old value may not be this node's alone."""
    name = f"{slot.node.name or slot.node.op_type}_block_reconstructed_{serial}"
    value = ir.Value(name=name, const_value=ir.tensor(array.astype(np.float32), name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.FLOAT)
    graph.register_initializer(value)
    slot.node.replace_input_with(slot.index, value)


class GraphProjections:
    """The projections of a pruned, unfused graph (changed in place by :meth:`write`)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._slots = _layer_slots(find_blocks(model.graph))

    def read(self) -> list[LayerWeights]:
        layers: list[LayerWeights] = []
        for entry in self._slots:
            layer: LayerWeights = {}
            for key in PROJECTIONS:
                weight = _read(entry[key].weight)
                if weight is None:
                    raise UserError(
                        f"layer {len(layers)} {key}: the weight is not a constant; cannot reconstruct"
                    )
                layer[key] = (np.array(weight), _read(entry[key].bias))
            layers.append(layer)
        return layers

    def write(self, layers: list[LayerWeights]) -> None:
        serial = 0
        for entry, layer in zip(self._slots, layers, strict=True):
            for key in PROJECTIONS:
                weight, bias = layer[key]
                _write(self.model.graph, entry[key].weight, weight, serial)
                slot, old = entry[key].bias, _read(entry[key].bias)
                if slot is not None and bias is not None and old is not None:
                    _write(self.model.graph, slot, bias.reshape(old.shape), serial + 1)
                serial += 2
        RemoveUnusedNodesPass()(self.model)  # the replaced constants (and Identity nodes) go

    def logits(self, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The graph's first output over ``feeds`` (inputs the graph does not take are dropped)."""
        session = cpu_session(ir.to_proto(self.model))
        names = {i.name for i in session.get_inputs()}
        return np.concatenate(
            [np.asarray(session.run(None, {k: v for k, v in f.items() if k in names})[0]) for f in feeds]
        )
