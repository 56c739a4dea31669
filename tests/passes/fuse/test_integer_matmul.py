"""``MatMulInteger -> Cast -> Mul(scales)`` becomes one ``MatMulIntegerToFloat`` with the same
numbers, under the integer node's name; a chain read elsewhere is left alone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trimformer.passes.fuse.integer_matmul import fuse_matmul_integer_to_float

K, N = 8, 4


def _chain(scales_first: bool = False, zero_points: bool = True, read_cast: bool = False) -> onnx.ModelProto:
    """x (uint8) -> MatMulInteger(W) -> Cast -> Mul(a_scale * w_scale) -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(0, 255, size=(K, N), dtype=np.uint8), "w"),
        numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(3, np.uint8), "a_zp"),
        numpy_helper.from_array(np.array(128, np.uint8), "w_zp"),
    ]
    integer_inputs = ["x", "w"] + (["a_zp", "w_zp"] if zero_points else [])
    mul_inputs = ["scales", "product"] if scales_first else ["product", "scales"]
    nodes = [
        helper.make_node("MatMulInteger", integer_inputs, ["acc"], name="mm_quant"),
        helper.make_node("Cast", ["acc"], ["product"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["a_scale", "w_scale"], ["scales"], name="scales_mul"),
        helper.make_node("Mul", mul_inputs, ["y"], name="output_mul"),
    ]
    outputs = ["y"] + (["product"] if read_cast else [])
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["b", K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("scales_first", [False, True])
@pytest.mark.parametrize("zero_points", [False, True])
def test_the_chain_becomes_one_kernel_with_the_same_numbers(scales_first: bool, zero_points: bool) -> None:
    before = _chain(scales_first, zero_points)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    assert fuse_matmul_integer_to_float(after) == 1
    assert Counter(n.op_type for n in after.graph.node) == Counter(MatMulIntegerToFloat=1)
    (node,) = after.graph.node
    assert (node.name, node.domain, list(node.output)) == ("mm_quant", "com.microsoft", ["y"])
    want = ["x", "w", "a_scale", "w_scale"] + (["a_zp", "w_zp"] if zero_points else [])
    assert list(node.input) == want
    assert any(o.domain == "com.microsoft" for o in after.opset_import)
    x = np.random.default_rng(1).integers(0, 255, size=(5, K), dtype=np.uint8)
    np.testing.assert_allclose(_run(after, x)[0], _run(before, x)[0], rtol=1e-6, atol=1e-6)


def test_a_chain_read_elsewhere_is_left_alone() -> None:
    model = _chain(read_cast=True)
    was = onnx.ModelProto()
    was.CopyFrom(model)
    assert fuse_matmul_integer_to_float(model) == 0
    assert model == was
