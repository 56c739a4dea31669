"""The CPU kernel rewrites (split SkipLayerNorm, bias into the int8 matmul, bounded attention mask)
change which onnxruntime kernels run, never the numbers; and each rule leaves alone what it must."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trimformer.artifact import ModelArtifact
from trimformer.passes.fuse.cpu_kernels import MASK_FILTER_VALUE, CpuKernelsPass, prefer_cpu_kernels
from trimformer.passes.fuse.fusion import FuseConfig
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_fuse, run_quantize

MS = "com.microsoft"
HIDDEN = 8
NOTHING_FIRED = {"bias_gelu_folded": 0, "skip_layer_norm_split": 0, "mask_filter_bounded": 0}


def _padded_feeds(session: ort.InferenceSession, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if "mask" in i.name:
            mask = np.ones((batch, seq), dtype=np.int64 if "int64" in i.type else np.int32)
            for row in range(batch):
                mask[row, rng.integers(1, seq) :] = 0
            feeds[i.name] = mask
        elif "type" in i.name:
            feeds[i.name] = np.zeros((batch, seq), dtype=np.int64)
        elif "float" in i.type:
            feeds[i.name] = rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)
        else:
            feeds[i.name] = rng.integers(5, 80, size=(batch, seq), dtype=np.int64)
    return feeds


def _outputs(model: onnx.ModelProto, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [
        out for b, s in shapes for out in session.run(None, _padded_feeds(session, b, s, seed=b * 100 + s))
    ]


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    after = onnx.ModelProto()
    after.CopyFrom(model)
    return after, prefer_cpu_kernels(after)


def _assert_same_numbers(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    for ref, got in zip(_outputs(before, SHAPES), _outputs(after, SHAPES), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


SHAPES = [(1, 7), (3, 16), (2, 40)]


@pytest.mark.parametrize("quantized", [False, True])
def test_rewrites_keep_the_outputs_on_padded_batches(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path, quantized: bool
) -> None:
    if quantized:
        run_quantize(
            QuantizeStageConfig(
                model=str(tiny_bert_onnx),
                out=str(tmp_path / "m"),
                calibration=str(tiny_csv),
                quantize=QuantizeConfig(samples=16, cpu_kernels=False),
            )
        )
    else:
        run_fuse(str(tiny_bert_onnx), str(tmp_path / "m"), FuseConfig(cpu_kernels=False))
    before = ModelArtifact.open(tmp_path / "m").load_model()
    after, counts = _rewritten(before)
    was, ops = _ops(before), _ops(after)
    assert was["SkipLayerNormalization"] == 4 and not was["Sum"]
    assert counts["skip_layer_norm_split"] == 4 and not ops["SkipLayerNormalization"]
    assert ops["Sum"] == 4 and ops["LayerNormalization"] == was["LayerNormalization"] + 4
    assert counts["mask_filter_bounded"] == 2
    attention = [n for n in after.graph.node if n.op_type in ("Attention", "QAttention")]
    assert len(attention) == 2 and all(
        any(a.name == "mask_filter_value" and a.f == MASK_FILTER_VALUE for a in n.attribute)
        for n in attention
    )
    if quantized:
        # The bias of every BiasGelu and SkipLayerNorm moved into its int8 matmul.
        assert was["BiasGelu"] == 2
        assert counts["bias_gelu_folded"] == 2 and ops["Gelu"] == 2 and not ops["BiasGelu"]
        assert not ops["Add"]
        with_bias = [n for n in after.graph.node if n.op_type == "MatMulIntegerToFloat" and len(n.input) == 7]
        assert len(with_bias) == 2 + 4
    # The quantize pass finds its integer nodes by name: the rewritten matmuls keep theirs.
    assert {n.name for n in before.graph.node if n.op_type == "MatMulIntegerToFloat"} <= {
        n.name for n in after.graph.node
    }
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    _assert_same_numbers(before, after)


def test_the_rewrites_are_idempotent(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    run_fuse(str(tiny_bert_onnx), str(tmp_path / "f"), FuseConfig())
    model = ModelArtifact.open(tmp_path / "f").load_model()
    assert _ops(model)["Sum"] == 4 and not _ops(model)["SkipLayerNormalization"]
    again, counts = _rewritten(model)
    assert counts == NOTHING_FIRED
    assert again == model  # nothing fired: the proto is left as it was


def test_tensorrt_gets_standard_ops_only_and_webgpu_keeps_its_fused_kernels(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    summary = run_quantize(
        QuantizeStageConfig(
            model=str(tiny_bert_onnx),
            out=str(tmp_path / "trt"),
            calibration=str(tiny_csv),
            quantize=QuantizeConfig(preset="tensorrt", samples=16),
        )
    )
    graph = ModelArtifact.open(tmp_path / "trt").load_model().graph
    # TensorRT parses standard ONNX: no com.microsoft fusion, symmetric QDQ pairs instead.
    assert summary["target"] == "tensorrt" and not [n.op_type for n in graph.node if n.domain]
    assert Counter(n.op_type for n in graph.node)["QuantizeLinear"] > 0
    fused = run_fuse(str(tiny_bert_onnx), str(tmp_path / "webgpu"), target="webgpu")
    ops = Counter(n.op_type for n in ModelArtifact.open(tmp_path / "webgpu").load_model().graph.node)
    # WebGPU has SkipLayerNormalization and Attention kernels (kept whole: no CPU-kernel split) but
    # no EmbedLayerNormalization (that fusion is off for it).
    assert fused["target"] == "webgpu" and ops["SkipLayerNormalization"] == 4 and not ops["Sum"]
    assert ops["Attention"] == 2 and not ops["EmbedLayerNormalization"]


# Tiny graphs built here, one per rule and per case where a rule must not fire.


def _int8_matmul(name: str, x: str, out: str, rng: np.random.Generator, bias: bool = False) -> tuple:
    """DynamicQuantizeLinear(x) -> MatMulIntegerToFloat(.., W) -> out (with its own bias if asked)."""
    w = rng.integers(0, 255, size=(HIDDEN, HIDDEN), dtype=np.uint8)
    inits = [
        numpy_helper.from_array(w, f"{name}_w"),
        numpy_helper.from_array(np.array(0.01, np.float32), f"{name}_w_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), f"{name}_w_zp"),
        numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), f"{name}_b"),
    ]
    q = [f"{name}_xq", f"{name}_xs", f"{name}_xzp"]
    inputs = [q[0], f"{name}_w", q[1], f"{name}_w_scale", q[2], f"{name}_w_zp"] + (
        [f"{name}_b"] if bias else []
    )
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [x], q, name=f"{name}_quant_x"),
        helper.make_node("MatMulIntegerToFloat", inputs, [out], name=name, domain=MS),
    ]
    return nodes, inits


def _block(
    opset: int = 17,
    matmul_bias: bool = False,
    gelu_matmul_read_twice: bool = False,
    read_mean: bool = False,
    mask_filter: float | None = None,
) -> onnx.ModelProto:
    """x -> int8 matmul -> SkipLN(skip) -> int8 matmul -> BiasGelu -> Attention -> SkipLN(int8 matmul)."""
    rng = np.random.default_rng(0)
    inits = []
    matmuls = {
        name: _int8_matmul(name, x, out, rng, bias=name == "mm1" and matmul_bias)
        for name, x, out in (("mm1", "x", "h1"), ("mm2", "n1", "h2"), ("mm3", "x", "h3"))
    }
    for _, part in matmuls.values():
        inits += part
    for name, shape in (("gamma", [HIDDEN]), ("beta", [HIDDEN]), ("bias", [HIDDEN]), ("gelu_bias", [HIDDEN])):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    inits += [
        numpy_helper.from_array(rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32) / 3, "qkv_w"),
        numpy_helper.from_array(np.zeros(3 * HIDDEN, np.float32), "qkv_b"),
    ]
    ln_inputs = ["gamma", "beta", "bias"]
    attention = {"num_heads": 2} | ({"mask_filter_value": mask_filter} if mask_filter is not None else {})
    nodes = [
        *matmuls["mm1"][0],
        *matmuls["mm3"][0],
        helper.make_node(
            "SkipLayerNormalization",
            ["h1", "skip", *ln_inputs],
            ["n1", "mean"],
            "ln1",
            domain=MS,
            epsilon=1e-5,
        ),
        *matmuls["mm2"][0],
        helper.make_node("BiasGelu", ["h2", "gelu_bias"], ["g"], "gelu", domain=MS),
        helper.make_node(
            "Attention", ["g", "qkv_w", "qkv_b", "mask"], ["a"], "attention", domain=MS, **attention
        ),
        helper.make_node("SkipLayerNormalization", ["a", "h3", *ln_inputs], ["y"], "ln2", domain=MS),
    ]
    float_input = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", HIDDEN]) for n in ("x", "skip")
    ]
    outputs = ["y"] + (["h2"] if gelu_matmul_read_twice else []) + (["mean"] if read_mean else [])
    graph = helper.make_graph(
        nodes,
        "block",
        [*float_input, helper.make_tensor_value_info("mask", TensorProto.INT32, ["b", "s"])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    )


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def test_every_rule_fires_on_the_block_and_keeps_the_numbers() -> None:
    before = _block()
    after, counts = _rewritten(before)
    assert counts == {"bias_gelu_folded": 1, "skip_layer_norm_split": 2, "mask_filter_bounded": 1}
    was, ops = _ops(before), _ops(after)
    assert (was["SkipLayerNormalization"], was["BiasGelu"]) == (2, 1)
    assert ops == was - Counter(SkipLayerNormalization=2, BiasGelu=1) + Counter(
        Sum=2, LayerNormalization=2, Gelu=1
    )
    # Each bias went into the int8 matmul that was its input's sole producer: x, skip, BiasGelu's.
    assert _node(after, "mm1").input[6] == "bias" and _node(after, "mm3").input[6] == "bias"
    assert _node(after, "mm2").input[6] == "gelu_bias" and _node(after, "gelu").domain == MS
    assert [len(n.input) for n in after.graph.node if n.op_type == "Sum"] == [2, 2]
    ln1 = _node(after, "ln1")
    assert ln1.op_type == "LayerNormalization" and ln1.input[1:] == ["gamma", "beta"]
    assert {a.name: helper.get_attribute_value(a) for a in ln1.attribute} == pytest.approx(
        {"axis": -1, "epsilon": 1e-5}
    )
    assert next(a.f for a in _node(after, "attention").attribute if a.name == "mask_filter_value") == -50.0
    _assert_same_numbers(before, after)
    assert _rewritten(after)[1] == NOTHING_FIRED


def test_a_matmul_with_its_own_bias_keeps_it_and_the_bias_goes_into_the_sum() -> None:
    before = _block(matmul_bias=True)
    after, counts = _rewritten(before)
    assert counts["skip_layer_norm_split"] == 2
    assert _node(after, "mm1").input[6] == "mm1_b"
    assert sorted(len(n.input) for n in after.graph.node if n.op_type == "Sum") == [2, 3]
    _assert_same_numbers(before, after)


def test_a_matmul_read_elsewhere_keeps_the_bias_gelu() -> None:
    before = _block(gelu_matmul_read_twice=True)
    after, counts = _rewritten(before)
    assert counts["bias_gelu_folded"] == 0 and _ops(after)["BiasGelu"] == 1
    assert len(_node(after, "mm2").input) == 6
    _assert_same_numbers(before, after)


def test_a_skip_layer_norm_whose_mean_is_read_stays() -> None:
    after, counts = _rewritten(_block(read_mean=True))
    assert counts["skip_layer_norm_split"] == 1
    assert _node(after, "ln1").op_type == "SkipLayerNormalization"


def test_no_split_below_opset_17() -> None:
    after, counts = _rewritten(_block(opset=16))
    assert counts["skip_layer_norm_split"] == 0 and _ops(after)["SkipLayerNormalization"] == 2


def test_a_mask_filter_value_already_set_is_kept() -> None:
    after, counts = _rewritten(_block(mask_filter=-1000.0))
    assert counts["mask_filter_bounded"] == 0
    assert [a.f for a in _node(after, "attention").attribute if a.name == "mask_filter_value"] == [-1000.0]


def test_the_pass_runs_on_onnx_ir_and_checks_its_result() -> None:
    model = ir.from_proto(_block())
    report = CpuKernelsPass(mask_filter_value=-30.0)(model)
    assert report.modified and report.stats["mask_filter_bounded"] == 1
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert attention.attributes.get_float("mask_filter_value") == -30.0
    # ensures(): a rule that would still match is a failed postcondition.
    del attention.attributes["mask_filter_value"]
    with pytest.raises(Exception, match="still matches"):
        CpuKernelsPass().ensures(model)
