"""What the passes' self-checks share: inputs for a graph, and how far two graphs' outputs differ.

A pass that rewrites a model checks the result against its input (fuse, fp16, prune) or reports
how far it moved (quantize). The inputs are built from the graph's own input types and shapes:
token ids within the smallest table they index (any id is then valid), attention masks, zero
token types, normal noise for float inputs. The comparison runs both models in CPU sessions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from trimformer.runtime.session import cpu_session

__all__ = ["OutputDifference", "compare_outputs", "random_feeds"]

# Ids start here: the lowest ids are special tokens ([PAD], [UNK], ...) in most vocabularies.
_FIRST_ID = 5
_UNKNOWN_VOCAB = 100


@dataclass(frozen=True)
class OutputDifference:
    """How far a candidate's outputs are from a reference's over the compared outputs and feeds."""

    max_abs: float
    # ||candidate - reference|| / ||reference|| (L2 over every compared element).
    relative: float


def _table_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> rows of the smallest embedding table it indexes (Gather, or the fused
    EmbedLayerNormalization's word and segment tables)."""
    rows = {init.name: int(init.dims[0]) for init in model.graph.initializer if init.dims}
    lookups: list[tuple[str, str]] = []
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1:
            lookups.append((node.input[1], node.input[0]))
        elif node.op_type == "EmbedLayerNormalization" and len(node.input) > 3:
            lookups += [(node.input[0], node.input[2]), (node.input[1], node.input[3])]
    bound: dict[str, int] = {}
    for ids, table in lookups:
        if ids and table in rows:
            bound[ids] = min(bound.get(ids, rows[table]), rows[table])
    return bound


def _shape(value: onnx.ValueInfoProto, batch: int, seq: int) -> tuple[int, ...]:
    """Fixed axes as declared; symbolic ones are batch (axis 0) and sequence (the others)."""
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return (batch, seq)
    return tuple(d.dim_value if d.dim_value > 0 else (batch if i == 0 else seq) for i, d in enumerate(dims))


def random_feeds(
    model: onnx.ModelProto, batch: int, seq: int, seed: int = 0, padded: bool = False
) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input; ``padded``: the last row's second half is padding
    (so a check also covers masked positions)."""
    rng = np.random.default_rng(seed)
    tables = _table_rows(model)
    # An id input no table is traced to: below the smallest 2-D weight's rows, valid for any table.
    fallback = min(
        (int(i.dims[0]) for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] >= 8),
        default=_UNKNOWN_VOCAB,
    )
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        name = value.name
        shape = _shape(value, batch, seq)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in name:
            mask = np.ones(shape, dtype=dtype)
            if padded and len(shape) > 1:
                mask[-1, ..., shape[-1] // 2 :] = 0
            feeds[name] = mask
        elif "type" in name:
            feeds[name] = np.zeros(shape, dtype=dtype)
        else:
            high = tables.get(name, fallback)
            feeds[name] = rng.integers(min(_FIRST_ID, high - 1), high, size=shape).astype(dtype)
    return feeds


def compare_outputs(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    all_outputs: bool = False,
) -> OutputDifference:
    """Run both models on each feed (each given the inputs it takes) and compare output 0, or
    every output. A non-finite difference is reported as such (callers refuse it)."""
    sessions = [cpu_session(model) for model in (reference, candidate)]
    inputs = [{i.name for i in session.get_inputs()} for session in sessions]
    worst = sq_diff = sq_ref = 0.0
    for feed in feeds:
        want, got = (
            session.run(None, {k: v for k, v in feed.items() if k in names})
            for session, names in zip(sessions, inputs, strict=True)
        )
        pairs = zip(want, got, strict=True) if all_outputs else [(want[0], got[0])]
        for expected, actual in pairs:
            diff = np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64)
            worst = max(worst, float(np.max(np.abs(diff)))) if np.all(np.isfinite(diff)) else float("inf")
            sq_diff += float(np.sum(diff**2))
            sq_ref += float(np.sum(np.asarray(expected, dtype=np.float64) ** 2))
    return OutputDifference(worst, float(np.sqrt(sq_diff / max(sq_ref, 1e-30))))
