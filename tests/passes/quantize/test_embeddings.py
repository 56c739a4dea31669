"""The word-embedding table in 8 bits without the embedding fusion: GatherBlockQuantized gives the
rows of the dequantized table, close to the float ones; a table used elsewhere is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from trimformer.passes.quantize.embeddings import quantize_other_tables, quantize_word_embeddings


def _embedding_graph(table: np.ndarray, tied: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["rows"], name="word")]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)]
    if tied:  # an output projection reading the same table (tied weights)
        nodes.append(helper.make_node("MatMul", ["rows", "table_t"], ["logits"]))
        nodes.append(helper.make_node("Transpose", ["table"], ["table_t"]))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        outputs,
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_table_is_stored_in_8_bits_and_gathers_close_rows() -> None:
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((500, 64)) * 0.05).astype(np.float32)
    model = _embedding_graph(table)
    assert quantize_word_embeddings(model) == 1
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized"]
    stored = {init.name: init for init in model.graph.initializer}
    assert "table" not in stored and stored["table_quantized"].data_type == TensorProto.UINT8
    ids = rng.integers(0, 500, size=(3, 7))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"input_ids": ids})[0]
    # Half a step of a block's range at most: 8 bits over about 6 standard deviations.
    assert rows.shape == (3, 7, 64) and np.abs(rows - table[ids]).max() < 0.3 * 0.05 / 255 * 6 * 10


def test_a_table_used_elsewhere_stays_float() -> None:
    table = np.ones((300, 32), np.float32)
    model = _embedding_graph(table, tied=True)
    assert quantize_word_embeddings(model) == 0
    assert model.graph.node[0].op_type == "Gather"


def test_the_table_in_4_bits_is_half_the_bytes_and_gathers_close_rows() -> None:
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((500, 64)) * 0.05).astype(np.float32)
    eight, four = _embedding_graph(table), _embedding_graph(table)
    assert quantize_word_embeddings(eight) == 1 and quantize_word_embeddings(four, bits=4) == 1
    node = four.graph.node[0]
    assert node.op_type == "GatherBlockQuantized"
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["bits"] == 4

    def table_bytes(model: onnx.ModelProto) -> int:
        return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)

    # Codes: two a byte (16,000 bytes against 32,000); scales and zero points per block of 32.
    assert table_bytes(four) < 0.6 * table_bytes(eight)
    ids = rng.integers(0, 500, size=(2, 9))
    rows = {}
    for name, model in (("8", eight), ("4", four)):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        rows[name] = session.run(None, {"input_ids": ids})[0]
    error4 = np.abs(rows["4"] - table[ids]).max()
    # A 4-bit step is a block's range / 15: at most half of it off, and coarser than 8 bits.
    block_range = np.ptp(table.reshape(500, 2, 32), axis=-1).max()
    assert error4 <= block_range / 15 / 2 * 1.01
    assert error4 > np.abs(rows["8"] - table[ids]).max()


def test_beside_a_4_bit_word_table_large_position_tables_go_to_8_bits() -> None:
    rng = np.random.default_rng(2)
    word = (rng.standard_normal((300, 64)) * 0.05).astype(np.float32)
    position = (rng.standard_normal((600, 64)) * 0.05).astype(np.float32)  # 153.6 KB in float
    types = (rng.standard_normal((2, 64)) * 0.05).astype(np.float32)  # 512 bytes: stays float
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["w"]),
        helper.make_node("Gather", ["position", "position_ids"], ["p"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Sum", ["w", "p", "t"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
        for name in ("input_ids", "position_ids", "token_type_ids")
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((word, "word"), (position, "position"), (types, "types"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert quantize_word_embeddings(model, bits=4) == 1 and quantize_other_tables(model) == 1
    bits = {
        n.input[1]: next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type == "GatherBlockQuantized"
    }
    assert bits == {"input_ids": 4, "position_ids": 8}
    assert [n.op_type for n in model.graph.node].count("Gather") == 1  # the token-type table
    feeds = {name: rng.integers(0, 2, size=(2, 5)) for name in ("token_type_ids",)}
    feeds |= {
        "input_ids": rng.integers(0, 300, size=(2, 5)),
        "position_ids": rng.integers(0, 600, size=(2, 5)),
    }
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)[0]
    exact = word[feeds["input_ids"]] + position[feeds["position_ids"]] + types[feeds["token_type_ids"]]
    assert np.abs(out - exact).max() < 0.05 * 6 / 15  # within a 4-bit step of the word table's range
