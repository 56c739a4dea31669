"""The self-checks' shared inputs and output comparison, on small hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trimformer.passes._checks import compare_outputs, random_feeds
from trimformer.passes.intermediates import session_with_outputs, with_outputs


def _lookup_model(scale: float = 1.0, vocab: int = 30) -> onnx.ModelProto:
    """Embedding lookup of ``input_ids`` times the mask and ``scale``; a float ``noise`` input added."""
    table = numpy_helper.from_array(np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4), "table")
    factor = numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("Mul", ["masked", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "noise"], ["out"]),
    ]
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        nodes,
        "lookup",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT32, ["batch", "seq"]),
            helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", "seq", 4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 4])],
        [table, factor, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_random_feeds_follow_the_graphs_inputs() -> None:
    feeds = random_feeds(_lookup_model(vocab=30), 3, 7, seed=1, padded=True)
    ids = feeds["input_ids"]
    assert ids.shape == (3, 7) and ids.dtype == np.int64
    # Ids index the table they are gathered from, above the special-token range.
    assert ids.min() >= 5 and ids.max() < 30
    assert feeds["token_type_ids"].dtype == np.int32 and not feeds["token_type_ids"].any()
    # Fixed axes keep their size; float inputs get noise.
    assert (
        feeds["noise"].shape == (3, 7, 4) and feeds["noise"].dtype == np.float32 and feeds["noise"].std() > 0
    )
    mask = feeds["attention_mask"]
    assert mask[:2].all() and mask[2, :3].all() and not mask[2, 3:].any()
    again = random_feeds(_lookup_model(vocab=30), 3, 7, seed=1, padded=True)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_compare_outputs_measures_absolute_and_relative_error() -> None:
    feeds = [random_feeds(_lookup_model(), 2, 5, seed=s) for s in range(2)]
    same = compare_outputs(_lookup_model(), _lookup_model(), feeds)
    assert same.max_abs == 0.0 and same.relative == 0.0
    # 1 % larger embeddings: the relative error of the sum reflects it, the absolute one is its size.
    moved = compare_outputs(_lookup_model(), _lookup_model(scale=1.01), feeds)
    want = [_lookup_model_run(f, 1.0) for f in feeds]
    got = [_lookup_model_run(f, 1.01) for f in feeds]
    expected_abs = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    assert np.isclose(moved.max_abs, expected_abs, rtol=1e-4)
    assert 0.0 < moved.relative < 0.01


def _lookup_model_run(feed: dict[str, np.ndarray], scale: float) -> np.ndarray:
    session = session_with_outputs(_lookup_model(scale=scale), [])
    return np.asarray(session.run(None, feed)[0], dtype=np.float64)


def test_a_non_finite_difference_is_reported_as_infinite() -> None:
    feeds = [random_feeds(_lookup_model(), 2, 5)]
    assert compare_outputs(_lookup_model(), _lookup_model(scale=np.inf), feeds).max_abs == np.inf


def test_with_outputs_exposes_intermediate_values() -> None:
    model = _lookup_model()
    feed = random_feeds(model, 2, 5)
    part = with_outputs(model, ["emb"], only=True)
    # Only what ``emb`` depends on is kept; the values match the full model's.
    assert [n.op_type for n in part.graph.node] == ["Gather"]
    full = session_with_outputs(model, ["emb"]).run(["emb"], feed)[0]
    np.testing.assert_array_equal(session_with_outputs(model, ["emb"], only=True).run(["emb"], feed)[0], full)
    np.testing.assert_array_equal(full, np.arange(30 * 4, dtype=np.float32).reshape(30, 4)[feed["input_ids"]])
