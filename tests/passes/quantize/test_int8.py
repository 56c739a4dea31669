"""The quantize pass on tiny graphs built here: structure, numbers, bad input, accuracy-aware mode."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trimformer.errors import GateFailed, UserError
from trimformer.passes.base import PassContext
from trimformer.passes.quantize.calibrate import load_ranges, save_ranges
from trimformer.passes.quantize.int8 import RANGES_FILE, QuantizeConfig, QuantizePass

HIDDEN = 16


class Feeds:
    """A streaming source of ``batches`` random batches (seeded), shape (batch, seq, HIDDEN)."""

    def __init__(
        self,
        batches: int = 4,
        batch: int = 4,
        seq: int = 6,
        name: str = "x",
        seed: int = 0,
        outlier: float = 1.0,
    ) -> None:
        self.left, self.batch, self.seq, self.name = batches, batch, seq, name
        self.rng = np.random.default_rng(seed)
        self.outlier = outlier

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.left == 0:
            return None
        self.left -= 1
        x = self.rng.standard_normal((self.batch, self.seq, HIDDEN)).astype(np.float32)
        x[..., 0] *= self.outlier
        return {self.name: x}


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def make_block(outlier_branch: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W1) + b -> LayerNorm -> MatMul(W2) -> Softmax, plus (optionally) a second
    branch x -> MatMul(W3) added to the logits, whose input carries one huge channel."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(_w(rng, HIDDEN, 32), "W1"),
        numpy_helper.from_array(np.zeros(32, np.float32), "b1"),
        numpy_helper.from_array(np.ones(32, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(32, np.float32), "beta"),
        numpy_helper.from_array(_w(rng, 32, 8), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("LayerNormalization", ["hb", "gamma", "beta"], ["ln"], name="norm", axis=-1),
        helper.make_node("MatMul", ["ln", "W2"], ["logits0"], name="head"),
    ]
    if outlier_branch:
        inits.append(numpy_helper.from_array(_w(rng, HIDDEN, 8), "W3"))
        nodes += [
            helper.make_node("MatMul", ["x", "W3"], ["side"], name="side"),
            helper.make_node("Add", ["logits0", "side"], ["logits"], name="residual"),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["logits0"], ["logits"], name="ident"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1))
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0])


def quantize(
    model: onnx.ModelProto, tmp_path: Path, make_feeds=Feeds, evaluate=None, **cfg
) -> tuple[onnx.ModelProto, dict]:
    cfg.setdefault("samples", 8)
    cfg.setdefault("fuse", False)
    # Smoothing is tested on its own below; on Gaussian inputs it only moves rounding around.
    cfg.setdefault("smooth_alpha", 0.0)
    ctx = PassContext(calibration=make_feeds, evaluate=evaluate, scratch=tmp_path)
    report = QuantizePass(QuantizeConfig(**cfg), ctx)(ir.from_proto(model))
    report.stats["_files"] = report.files
    return ir.to_proto(report.model), report.stats


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def test_qoperator_makes_int8_matmuls_and_keeps_norm_and_softmax(tmp_path: Path) -> None:
    model = make_block()
    q, stats = quantize(model, tmp_path)
    counts = ops(q)
    assert counts["MatMulIntegerToFloat"] == 2 and counts["MatMul"] == 0
    assert counts["LayerNormalization"] == 1 and counts["Softmax"] == 1
    weights = {i.name: i for i in q.graph.initializer}
    assert any(w.data_type == TensorProto.INT8 and len(w.dims) == 2 for w in weights.values())
    assert stats["quantized"] == 2 and stats["float_nodes"] == []
    assert stats["float_ops"]["LayerNormalization"]["count"] == 1
    # Outputs of the softmax within 0.02 of the float graph on seeded random inputs.
    feed = Feeds(batches=1, seed=7).get_next()
    assert feed is not None
    assert np.max(np.abs(run(q, feed) - run(model, feed))) < 0.02


def test_qdq_format_puts_dequantize_before_each_matmul(tmp_path: Path) -> None:
    model = make_block()
    q, stats = quantize(model, tmp_path, format="qdq")
    producers = {o: n for n in q.graph.node for o in n.output}
    matmuls = [n for n in q.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    for node in matmuls:
        assert producers[node.input[0]].op_type == "DequantizeLinear"
        assert producers[node.input[1]].op_type == "DequantizeLinear"
    assert ops(q)["LayerNormalization"] == 1 and ops(q)["Softmax"] == 1
    # MatMul outputs stay float: no QuantizeLinear right after a MatMul.
    consumers = [n for n in q.graph.node if any(i in {m.output[0] for m in matmuls} for i in n.input)]
    assert all(n.op_type != "QuantizeLinear" for n in consumers)
    feed = Feeds(batches=1, seed=3).get_next()
    assert feed is not None
    assert np.max(np.abs(run(q, feed) - run(model, feed))) < 0.02
    assert stats["settings"]["format"] == "qdq"


def test_tensorrt_preset_is_symmetric_s8s8(tmp_path: Path) -> None:
    q, _ = quantize(make_block(), tmp_path, preset="tensorrt")
    zero_points = [i for i in q.graph.initializer if "zero_point" in i.name]
    assert zero_points
    for zp in zero_points:
        assert zp.data_type == TensorProto.INT8
        assert not numpy_helper.to_array(zp).any()


def test_smoothing_lowers_the_error_with_outlier_channels(tmp_path: Path) -> None:
    model = make_block(outlier_branch=True)
    feed = Feeds(batches=1, seed=7, outlier=30.0).get_next()
    assert feed is not None
    errors = {}
    for alpha in (0.0, 0.5):
        q, stats = quantize(
            model, tmp_path / str(alpha), make_feeds=lambda: Feeds(outlier=30.0), smooth_alpha=alpha
        )
        errors[alpha] = float(np.max(np.abs(run(q, feed) - run(model, feed))))
        if alpha:
            # One exact float Mul(x, 1/s) per smoothed node; the weights carry s.
            assert stats["smoothing"]["nodes"] == 3 and ops(q)["Mul"] == 3
    assert errors[0.5] < 0.6 * errors[0.0], errors


def test_calibration_cache_round_trips(tmp_path: Path) -> None:
    model = make_block()
    first, stats = quantize(model, tmp_path / "a")
    # The pass hands the cache it wrote back in its report, under the name the artifact keeps it.
    cache = stats["_files"][RANGES_FILE]
    ranges = load_ranges(cache)
    again = tmp_path / "again.json"
    save_ranges(ranges, again)
    reloaded = load_ranges(again)
    assert set(reloaded.keys()) == set(ranges.keys())
    for key in ranges:
        np.testing.assert_array_equal(
            np.asarray(reloaded[key].range_value), np.asarray(ranges[key].range_value)
        )
    # Reusing the cache without any calibration data gives the same model.
    ctx = PassContext(calibration=None, scratch=tmp_path)
    second = QuantizePass(QuantizeConfig(samples=8, fuse=False, calibration_cache=str(again)), ctx)(
        ir.from_proto(model)
    )
    inits = {i.name: numpy_helper.to_array(i) for i in first.graph.initializer}
    for init in ir.to_proto(second.model).graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), inits[init.name])
    assert second.stats["calibration"]["cache"] == "reused"


def test_calibration_memory_does_not_hold_batches(tmp_path: Path) -> None:
    # Batches of different shapes are fine (one batch per collect call, histograms merged).
    shapes = iter([(2, 3), (5, 9), (1, 4), (3, 7)])

    class Ragged(Feeds):
        def get_next(self) -> dict[str, np.ndarray] | None:
            shape = next(shapes, None)
            if shape is None:
                return None
            return {"x": self.rng.standard_normal((*shape, HIDDEN)).astype(np.float32)}

    for method in ("entropy", "percentile"):
        shapes = iter([(2, 3), (5, 9), (1, 4), (3, 7)])
        q, stats = quantize(make_block(), tmp_path / method, make_feeds=Ragged, method=method, samples=11)
        assert stats["calibration"]["rows"] == 11 and ops(q)["MatMulIntegerToFloat"] == 2


def _drop_evaluate(model_float: onnx.ModelProto):
    """Score = 1 - 100 x mean abs deviation from the float graph's output (a synthetic accuracy)."""
    feed = Feeds(batches=1, seed=11, outlier=60.0).get_next()
    assert feed is not None
    ref = run(model_float, feed)

    def evaluate(model: onnx.ModelProto) -> float:
        return 1.0 - 100.0 * float(np.mean(np.abs(run(model, feed) - ref)))

    return evaluate


def _outlier_feeds() -> Feeds:
    return Feeds(outlier=60.0)


def test_accuracy_aware_returns_worst_nodes_to_float_when_tight(tmp_path: Path) -> None:
    model = make_block(outlier_branch=True)
    evaluate = _drop_evaluate(model)
    q, stats = quantize(model, tmp_path, make_feeds=_outlier_feeds, evaluate=evaluate, max_accuracy_drop=0.01)
    aware = stats["accuracy_aware"]
    returned = [r["node"] for r in aware["returned_to_float"]]
    assert returned, aware
    assert aware["final_drop_points"] <= 0.01
    # The node reading the input with the huge channel is the most sensitive, and float again.
    assert next(iter(aware["sensitivity"])) in {"proj", "side"}
    assert {r["node"] for r in stats["float_nodes"]} == set(returned)
    assert all("budget" in r["reason"] for r in stats["float_nodes"])
    assert ops(q)["MatMul"] == len(returned)


def test_accuracy_aware_keeps_int8_when_loose(tmp_path: Path) -> None:
    model = make_block(outlier_branch=True)
    q, stats = quantize(
        model, tmp_path, make_feeds=_outlier_feeds, evaluate=_drop_evaluate(model), max_accuracy_drop=100.0
    )
    assert stats["accuracy_aware"]["returned_to_float"] == []
    assert ops(q)["MatMul"] == 0 and ops(q)["MatMulIntegerToFloat"] == 3


def test_accuracy_budget_that_cannot_be_met_fails_the_gate(tmp_path: Path) -> None:
    calls = iter([1.0])

    def evaluate(model: onnx.ModelProto) -> float:
        # The float model scores 1.0; every rewritten graph, even all-float, scores 0.9.
        return next(calls, 0.9)

    with pytest.raises(GateFailed, match="cannot be met"):
        quantize(make_block(), tmp_path, evaluate=evaluate, max_accuracy_drop=1.0)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"preset": "gpu-magic"},
            "unknown preset 'gpu-magic'; known presets: cpu-vnni, cpu-avx2, arm64, tensorrt",
        ),
        ({"method": "kl"}, "unknown method 'kl'; known methods: minmax, entropy, percentile"),
        ({"format": "qlinear"}, "unknown format"),
        ({"max_accuracy_drop": -1.0}, "must be 0 or more"),
    ],
)
def test_bad_config_is_refused(tmp_path: Path, cfg: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        quantize(make_block(), tmp_path, **cfg)


def test_bad_calibration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="calibration data is empty"):
        quantize(make_block(), tmp_path, make_feeds=lambda: Feeds(batches=0))
    with pytest.raises(UserError, match="has 8 rows but 64 were asked"):
        quantize(make_block(), tmp_path, make_feeds=lambda: Feeds(batches=2), samples=64)
    with pytest.raises(UserError, match="calibration data has columns input_ids but the model takes x"):
        quantize(make_block(), tmp_path, make_feeds=lambda: Feeds(name="input_ids"))
    with pytest.raises(UserError, match="needs calibration data"):
        quantize(make_block(), tmp_path, make_feeds=None)


def test_already_quantized_and_nothing_quantizable_are_refused(tmp_path: Path) -> None:
    q, _ = quantize(make_block(), tmp_path)
    with pytest.raises(UserError, match="already quantized"):
        quantize(q, tmp_path)
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], name="s", axis=-1)],
        "nothing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", HIDDEN])],
    )
    with pytest.raises(UserError, match="nothing to quantize"):
        quantize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)


def test_dynamic_mode_uses_dynamic_quantization(tmp_path: Path) -> None:
    q, stats = quantize(make_block(), tmp_path, make_feeds=None, dynamic=True)
    assert ops(q)["DynamicQuantizeLinear"] >= 1 and stats["quantized"] == 2
