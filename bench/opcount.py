"""Counting the arithmetic a graph does per inference, and the machine's matrix-multiply peak.

Operations are multiply-adds counted as 2 ops, for the matrix products that dominate a
Transformer (projections, scores, context, fused Attention and the integer/QDQ forms of each).
Elementwise work is ignored: it is a few percent at these sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from bench.common import open_session
from trimformer.validation.latency import time_calls

__all__ = ["count_ops", "measure_peak"]

_MATMUL_LIKE = {
    "MatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "FusedMatMul",
    "Gemm",
    "QGemm",
}


def _observed_shapes(model: onnx.ModelProto, names: set[str], batch: int, seq: int) -> dict[str, list[int]]:
    """Run the graph once with every tensor in ``names`` exposed as an output, and read their shapes.

    Static shape inference loses dims through the head-split reshapes (-1); a real run does not.
    """
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in probe.graph.output}
    initializers = {i.name for i in probe.graph.initializer}
    for name in sorted(names - existing - initializers):
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = open_session(probe, optimization="disabled")
    feeds = {}
    for value in session.get_inputs():
        if "mask" in value.name:
            feeds[value.name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feeds[value.name] = np.full((batch, seq), 7 if value.name == "input_ids" else 0, dtype=np.int64)
    outputs = session.run(None, feeds)
    shapes = {o.name: list(arr.shape) for o, arr in zip(session.get_outputs(), outputs, strict=True)}
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def count_ops(model_path: Path, batch: int = 1, seq: int = 128) -> float:
    """Multiply-add ops (x2) of the matrix products for one inference at batch x seq."""
    model = onnx.load(str(model_path))
    wanted: set[str] = set()
    for node in model.graph.node:
        if node.op_type in _MATMUL_LIKE:
            wanted.update((node.input[0], node.output[0]))
        elif node.op_type in ("Attention", "QAttention"):
            wanted.add(node.input[1])
    shapes = _observed_shapes(model, wanted, batch, seq)
    rows = batch * seq
    total = 0.0
    for node in model.graph.node:
        if node.op_type in _MATMUL_LIKE:
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out:
                transposed = node.op_type in ("Gemm", "QGemm") and any(
                    attr.name == "transA" and attr.i for attr in node.attribute
                )
                inner = a[0] if transposed else a[-1]
                # 2 ops per multiply-add, for every element of the output.
                total += 2.0 * float(np.prod(out)) * inner
        elif node.op_type in ("Attention", "QAttention"):
            weight = shapes.get(node.input[1])
            if weight:
                hidden_in, qkv = weight[0], weight[1]
                total += 2.0 * rows * hidden_in * qkv
                per_branch = qkv // 3
                # scores and context: two seq x seq products over the per-branch width
                total += 2.0 * 2.0 * batch * seq * seq * per_branch
    return total


def _square_model(op: str, size: int) -> onnx.ModelProto:
    if op == "MatMulInteger":
        inputs = [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [size, size]),
        ]
        output = helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])
    else:
        inputs = [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size]),
        ]
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "peak", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure_peak(op: str, threads: int, size: int = 2048, seconds: float = 3.0) -> float:
    """Ops per second of one large square product through onnxruntime (best of repeated runs)."""
    session = open_session(_square_model(op, size), threads)
    rng = np.random.default_rng(0)
    if op == "MatMulInteger":
        feeds = {
            "a": rng.integers(0, 255, (size, size), dtype=np.uint8),
            "b": rng.integers(-127, 127, (size, size), dtype=np.int8),
        }
    else:
        feeds = {
            "a": rng.standard_normal((size, size), dtype=np.float32),
            "b": rng.standard_normal((size, size), dtype=np.float32),
        }
    samples_ms = time_calls(
        lambda: session.run(None, feeds), warmup=1, runs=1, min_seconds=seconds, max_runs=1_000_000
    )
    return 2.0 * size**3 / (min(samples_ms) / 1000.0)
