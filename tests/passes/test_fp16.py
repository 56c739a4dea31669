from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes import PostconditionError

from trimformer.artifact import ModelArtifact
from trimformer.errors import ParityError, UserError
from trimformer.passes._checks import random_feeds
from trimformer.passes.base import PassContext, PassReport, apply_pass
from trimformer.passes.fp16 import Fp16Config, Fp16Pass


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


@pytest.mark.parametrize("fixture", ["tiny_bert_onnx", "tiny_plain_onnx"])
def test_fp16_keeps_sensitive_ops_float32_and_matches(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    art = ModelArtifact.open(request.getfixturevalue(fixture))
    new, report = apply_pass(art, "fp16", Fp16Config(), PassContext(), tmp_path / "fp16")
    model = onnx.load(str(new.model_path))
    types = {t.name: t.data_type for t in model.graph.initializer}
    matmul_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in types]
    assert matmul_weights and all(types[w] == onnx.TensorProto.FLOAT16 for w in matmul_weights)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(
        types.get(n.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for n in norms
    )
    assert report.stats["kept_float32_ops"]["Softmax"] >= 2
    # Inputs and outputs keep their types; outputs close to float32 on a shape the pass never checked.
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    feeds = random_feeds(onnx.load(str(art.model_path)), 3, 40, seed=5)
    np.testing.assert_allclose(_run(new.model_path, feeds), _run(art.model_path, feeds), atol=1e-2)
    assert new.size_bytes() < art.size_bytes()
    assert new.meta.lineage[-1].step == "fp16"


def test_fp16_self_check_refuses_a_loose_result(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="fp16: outputs differ"):
        apply_pass(
            ModelArtifact.open(tiny_bert_onnx), "fp16", Fp16Config(atol=1e-12), PassContext(), tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()


def test_fp16_twice_is_refused(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    first, _ = apply_pass(
        ModelArtifact.open(tiny_bert_onnx), "fp16", Fp16Config(), PassContext(), tmp_path / "a"
    )
    with pytest.raises(UserError, match="no float32 weights"):
        apply_pass(first, "fp16", Fp16Config(), PassContext(), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_fp16_check_runs_in_ensures_on_the_model_it_is_given(tiny_bert_onnx: Path) -> None:
    float_model = ir.from_proto(onnx.load(str(tiny_bert_onnx / "model.onnx")))
    the_pass = Fp16Pass(Fp16Config(), PassContext())
    with pytest.raises(PostconditionError, match="call it first"):
        the_pass.ensures(float_model)
    report = the_pass(float_model)
    assert isinstance(report, PassReport) and 0 < report.stats["max_abs_diff"] <= 2e-2
    # A converted graph that drifted (the classifier's bias shifted by 1) fails the same check.
    bias = [n for n in report.model.graph if n.op_type == "Gemm"][-1].inputs[2]
    assert bias is not None and bias.const_value is not None
    bias.const_value = ir.tensor(bias.const_value.numpy() + 1, name=bias.name)
    with pytest.raises(ParityError, match="fp16: outputs differ"):
        the_pass.ensures(report.model)
    # Called directly (not through apply_pass), the pass raises the check's own error too.
    with pytest.raises(ParityError, match="fp16: outputs differ"):
        Fp16Pass(Fp16Config(atol=1e-12), PassContext())(float_model)
