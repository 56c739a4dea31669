"""Importance of heads and feed-forward neurons: one score per unit, kept apart from the surgery.

* ``magnitude``: L2 norm of the unit's weights (Q/K/V columns and output rows of a head; up column
  and down row of a neuron). Needs no data.
* ``activation``: L2 norm, over calibration tokens run through onnxruntime, of what the unit adds to
  the residual stream (a head's context times its output rows; a neuron's activation times its
  down row).
* ``ablation``: the increase of the loss (KL divergence to the unpruned model's predictions, or
  squared error for embeddings) when one head is masked, measured with onnxruntime; for users who
  only have the ONNX file. Neurons, too many to ablate one by one, get ``activation`` scores.
* ``fisher``: computed on the PyTorch source (``trimformer.training.fisher``) and handed over as data.

Scores are higher-is-more-important and comparable across layers within a kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from trimformer.passes.base import CalibrationFeeds, iter_feeds
from trimformer.passes.graph import EncoderLayout, Residual, const_array
from trimformer.passes.intermediates import iter_outputs, session_with_outputs
from trimformer.progress import progress_bar

__all__ = [
    "Scores",
    "ablation_scores",
    "activation_scores",
    "magnitude_scores",
    "reads_first_token_only",
    "token_mask",
]

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    heads: list[np.ndarray]
    neurons: list[np.ndarray]

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {"heads": [h.tolist() for h in self.heads], "neurons": [n.tolist() for n in self.neurons]}


def magnitude_scores(layout: EncoderLayout) -> Scores:
    heads, neurons = [], []
    for layer in layout.layers:
        attn, d = layer.attention, layer.attention.head_dim
        out = attn.out.weight.astype(np.float64)
        if attn.fused is not None:
            packed = const_array(attn.fused.inputs[1])
            assert packed is not None
            width = attn.num_heads * d
            qkv = [packed[:, i * width : (i + 1) * width] for i in range(3)]
        else:
            qkv = [lin.weight for lin in (attn.q, attn.k, attn.v) if lin is not None]
        sq = sum((w.astype(np.float64) ** 2).sum(axis=0) for w in qkv) + (out**2).sum(axis=1)
        heads.append(np.sqrt(sq.reshape(attn.num_heads, d).sum(axis=1)))
        up = const_array(layer.ffn.up.inputs[1])
        assert up is not None
        down = layer.ffn.down.weight.astype(np.float64)
        neurons.append(np.sqrt((up.astype(np.float64) ** 2).sum(axis=0) + (down**2).sum(axis=1)))
    return Scores(heads, neurons)


def token_mask(feeds: dict[str, np.ndarray], batch: int, seq: int) -> np.ndarray:
    """Which (batch, seq) positions are real tokens (padding contributes nothing to scores)."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.shape != (batch, seq):
        return np.ones((batch, seq), dtype=bool)
    return mask.astype(bool)


def _tokens(value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return value[mask].astype(np.float64)


def _stream_norms(values: dict[str, np.ndarray], residual: Residual, mask: np.ndarray) -> np.ndarray:
    """Per real token, the norm of what the block's LayerNorm normalises (stream + branch); ones
    where the graph has no plain Add to read it from (a fused SkipLayerNormalization)."""
    name = _sum_name(residual)
    if name is None:
        return np.ones(int(mask.sum()))
    return np.linalg.norm(_tokens(values[name], mask), axis=-1) + 1e-6


def _sum_name(residual: Residual) -> str | None:
    node = residual.node
    return str(node.outputs[0].name) if node.op_type == "Add" and node.domain in ("", "ai.onnx") else None


def reads_first_token_only(layout: EncoderLayout) -> bool:
    """Whether the model reads only the first position of the last layer's output (a [CLS]
    classifier: ``Gather(axis=1, index 0)`` after the final LayerNorm): then the last layer's units
    matter only there."""
    last = layout.layers[-1].ffn.residual.node
    final = last.outputs[0]
    if last.op_type == "Add":
        norms = [use.node for use in final.uses()]
        if len(norms) != 1 or norms[0].op_type != "LayerNormalization":
            return False
        final = norms[0].outputs[0]
    readers = [use.node for use in final.uses()]
    if not readers or final.is_graph_output():
        return False
    return all(_gathers_first(node) for node in readers)


def _gathers_first(node: ir.Node) -> bool:
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return False
    axis = node.attributes.get_int("axis", 0)
    index = const_array(node.inputs[1])
    return axis == 1 and index is not None and index.size == 1 and int(index.reshape(-1)[0]) == 0


def activation_scores(
    model: onnx.ModelProto, layout: EncoderLayout, calibration: Callable[[], CalibrationFeeds]
) -> Scores:
    """What each unit adds to the residual stream, relative to the stream it is added to.

    A block's output goes through LayerNorm, which divides by the size of stream + branch, so a
    unit matters by its share of that sum: the same absolute contribution is large in layer 0,
    where the stream is small, and small in the last layers, where it has grown. Measured in
    absolute terms, the first layer's heads scored lowest and a 50 % FLOPs budget removed all of
    them (2.2 points lost on the tweets teacher, docs/PRUNING.md). In a [CLS] classifier the last
    layer counts at the first position only: no other position reaches the output."""
    names: list[str] = []
    for layer in layout.layers:
        names += [str(layer.attention.context.name), str(layer.ffn.activation.name)]
        names += [n for r in (layer.attention.residual, layer.ffn.residual) if (n := _sum_name(r))]
    session = session_with_outputs(model, names)
    heads = [np.zeros(layer.attention.num_heads) for layer in layout.layers]
    neurons = [np.zeros(layer.ffn.size) for layer in layout.layers]
    outs = [layer.attention.out.weight.astype(np.float64) for layer in layout.layers]
    downs = [(layer.ffn.down.weight.astype(np.float64) ** 2).sum(axis=1) for layer in layout.layers]
    first_only = reads_first_token_only(layout)
    tokens = np.zeros(len(layout.layers))
    with progress_bar("activation importance", None) as bar:
        for feeds, values in iter_outputs(session, names, calibration):
            for i, layer in enumerate(layout.layers):
                ctx = values[str(layer.attention.context.name)]
                mask = token_mask(feeds, ctx.shape[0], ctx.shape[1])
                if first_only and i == len(layout.layers) - 1:
                    mask[:, 1:] = False
                tokens[i] += mask.sum()
                h, d = layer.attention.num_heads, layer.attention.head_dim
                scale = 1.0 / _stream_norms(values, layer.attention.residual, mask)
                x = _tokens(ctx, mask).reshape(-1, h, d) * scale[:, None, None]
                contrib = np.einsum("nhd,hdo->nho", x, outs[i].reshape(h, d, -1))
                heads[i] += (contrib**2).sum(axis=(0, 2))
                scale = 1.0 / _stream_norms(values, layer.ffn.residual, mask)
                act = _tokens(values[str(layer.ffn.activation.name)], mask) * scale[:, None]
                neurons[i] += (act**2).sum(axis=0) * downs[i]
            bar.advance(bar.task_ids[0])
    # Per counted position: the last layer of a [CLS] classifier counts one position a row.
    tokens = np.maximum(tokens, 1.0)
    return Scores(
        [np.sqrt(h / t) for h, t in zip(heads, tokens, strict=True)],
        [np.sqrt(n / t) for n, t in zip(neurons, tokens, strict=True)],
    )


def _masked_graph(model: onnx.ModelProto, layout: EncoderLayout) -> tuple[onnx.ModelProto, list[str]]:
    """The model with a head-mask input ``[heads x head_dim]`` per layer, multiplied into the context."""
    graph_model = ir.from_proto(model)
    # Value names are unique in a valid graph (node names need not be).
    by_output = {node.outputs[0].name: node for node in graph_model.graph if node.outputs}
    names = []
    for layer in layout.layers:
        attn = layer.attention
        matmul = by_output[attn.out.matmul.outputs[0].name]
        name = f"trimformer_head_mask_{layer.index}"
        mask = ir.Value(
            name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([attn.num_heads * attn.head_dim])
        )
        graph_model.graph.inputs.append(mask)
        mul = ir.Node("", "Mul", [matmul.inputs[0], mask], name=f"{name}_mul")
        graph_model.graph.insert_before(matmul, mul)
        matmul.replace_input_with(0, mul.outputs[0])
        names.append(name)
    return ir.to_proto(graph_model), names


def _divergence(reference: np.ndarray, output: np.ndarray, classify: bool) -> float:
    if classify:
        ref = reference - reference.max(axis=-1, keepdims=True)
        out = output - output.max(axis=-1, keepdims=True)
        log_p = ref - np.log(np.exp(ref).sum(axis=-1, keepdims=True))
        log_q = out - np.log(np.exp(out).sum(axis=-1, keepdims=True))
        return float((np.exp(log_p) * (log_p - log_q)).sum())
    return float(((reference - output) ** 2).sum())


def ablation_scores(
    model: onnx.ModelProto,
    layout: EncoderLayout,
    calibration: Callable[[], CalibrationFeeds],
    classify: bool,
) -> Scores:
    """Loss increase when each head alone is masked (one onnxruntime session, mask inputs)."""
    masked, mask_names = _masked_graph(model, layout)
    session = session_with_outputs(masked, [])
    output = session.get_outputs()[0].name
    ones = {
        name: np.ones(layer.attention.num_heads * layer.attention.head_dim, dtype=np.float32)
        for name, layer in zip(mask_names, layout.layers, strict=True)
    }
    batches = list(iter_feeds(calibration()))
    inputs = {i.name for i in session.get_inputs()}
    reference = [
        session.run([output], {**{k: v for k, v in f.items() if k in inputs}, **ones})[0] for f in batches
    ]
    heads = [np.zeros(layer.attention.num_heads) for layer in layout.layers]
    total = sum(layer.attention.num_heads for layer in layout.layers)
    with progress_bar("ablation importance", total) as bar:
        for i, layer in enumerate(layout.layers):
            d = layer.attention.head_dim
            for h in range(layer.attention.num_heads):
                masks = dict(ones)
                masks[mask_names[i]] = ones[mask_names[i]].copy()
                masks[mask_names[i]][h * d : (h + 1) * d] = 0.0
                loss = 0.0
                for feeds, ref in zip(batches, reference, strict=True):
                    out = session.run([output], {**{k: v for k, v in feeds.items() if k in inputs}, **masks})[
                        0
                    ]
                    loss += _divergence(ref, out, classify)
                heads[i][h] = loss
                bar.advance(bar.task_ids[0])
    neurons = activation_scores(model, layout, calibration).neurons
    return Scores(heads, neurons)
