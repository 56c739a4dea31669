"""Block reconstruction after pruning: tuned weights land in the graph and bring it closer to the
unpruned model than the ridge refit alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trimformer.artifact import ModelArtifact
from trimformer.data import Encoder, load_dataset
from trimformer.data.tokenizer import load_tokenizer
from trimformer.errors import UserError
from trimformer.passes.prune.structured import PruneConfig
from trimformer.pipeline.stages.prune import PruneStageConfig, run_prune


def _prune(model: Path, source: Path, data: Path, out: Path, block_steps: int) -> dict:
    return run_prune(
        PruneStageConfig(
            model=str(model),
            out=str(out),
            calibration=str(data),
            source=str(source),
            samples=64,
            prune=PruneConfig(flops=0.5, block_steps=block_steps),
        )
    )


def _logits(folder: Path, data: Path) -> np.ndarray:
    artifact = ModelArtifact.open(folder)
    names = [spec.name for spec in artifact.meta.inputs]
    encoder = Encoder(load_tokenizer(folder), names, 32, artifact.meta.tokenizer.pad_token_id)
    dataset = load_dataset(str(data), limit=64)
    session = ort.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
    feeds = encoder(dataset.texts, None)
    return np.asarray(session.run(None, {n: feeds[n] for n in names})[0])


@pytest.mark.parametrize("family", ["bert", "plain"])
def test_block_reconstruction_beats_ridge_alone(
    family: str, request: pytest.FixtureRequest, tiny_csv: Path, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(f"tiny_{family}")
    onnx_dir: Path = request.getfixturevalue(f"tiny_{family}_onnx")
    ridge = _prune(onnx_dir, source, tiny_csv, tmp_path / "ridge", block_steps=0)
    block = _prune(onnx_dir, source, tiny_csv, tmp_path / "block", block_steps=150)
    assert all(r["block"] != "layer" for r in ridge["reconstruction"])
    layers = [r for r in block["reconstruction"] if r["block"] == "layer"]
    assert [r["layer"] for r in layers] == list(range(len(ridge["layers"])))
    assert all(r["relative_error_after"] <= r["relative_error_before"] for r in layers)
    assert any(r["relative_error_after"] < 0.9 * r["relative_error_before"] for r in layers)
    # Same structure, different (tuned) weights, and closer to the unpruned model's logits.
    assert block["after"] == ridge["after"]
    reference = _logits(onnx_dir, tiny_csv)
    ridge_error = float(np.abs(_logits(tmp_path / "ridge", tiny_csv) - reference).mean())
    block_error = float(np.abs(_logits(tmp_path / "block", tiny_csv) - reference).mean())
    assert block_error < ridge_error


def test_fused_graph_keeps_ridge_only(
    tiny_bert: Path, tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trimformer.passes.base import PassContext, apply_pass
    from trimformer.passes.fuse.fusion import FuseConfig

    fused, _ = apply_pass(
        ModelArtifact.open(tiny_bert_onnx),
        "fuse",
        FuseConfig(num_heads=4, hidden_size=32, cpu_kernels=False),
        PassContext(),
        tmp_path / "fused",
    )
    with caplog.at_level(logging.WARNING):
        result = _prune(fused.path, tiny_bert, tiny_csv, tmp_path / "pruned", block_steps=20)
    assert result["reconstruction"] and all(r["block"] != "layer" for r in result["reconstruction"])
    assert "block reconstruction skipped" in caplog.text


def test_negative_block_steps_are_refused(
    tiny_bert: Path, tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="--block-steps"):
        _prune(tiny_bert_onnx, tiny_bert, tiny_csv, tmp_path / "bad", block_steps=-1)
    assert not (tmp_path / "bad").exists()


class _Feeds:
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _ffn_graph(up: np.ndarray, up_bias: np.ndarray, down: np.ndarray) -> onnx.ModelProto:
    """x -> MatMul(up) + b -> Relu -> MatMul(down) + b -> + x (one feed-forward block)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in ((up, "up"), (up_bias, "up_b"), (down, "down"), (np.full(4, 0.1), "down_b"))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "up"], ["h"]),
        helper.make_node("Add", ["h", "up_b"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["act"]),
        helper.make_node("MatMul", ["act", "down"], ["proj"]),
        helper.make_node("Add", ["proj", "down_b"], ["projb"]),
        helper.make_node("Add", ["projb", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_ridge_refit_keeps_a_removed_units_mean_in_the_bias() -> None:
    from trimformer.passes.prune.reconstruct import ReconstructionUnit, reconstruct

    rng = np.random.default_rng(0)
    up, up_bias, down = rng.normal(size=(4, 3)), rng.normal(size=3), rng.normal(size=(3, 4))
    up[:, 2], up_bias[2] = 0.0, 5.0  # neuron 2 always outputs 5: removing it only shifts the mean
    original = _ffn_graph(up, up_bias, down)
    pruned = _ffn_graph(up[:, :2], up_bias[:2], down[:2])
    batches = [{"x": rng.normal(size=(2, 5, 4)).astype(np.float32)} for _ in range(4)]
    unit = ReconstructionUnit(0, "ffn", "act", "proj", "x")
    fitted, steps = reconstruct(original, pruned, [unit], lambda: _Feeds(batches), alpha=1e-6)
    assert steps[0].relative_error_before > 0.5 and steps[0].relative_error_after < 1e-3
    fresh = {"x": rng.normal(size=(3, 7, 4)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, fresh)[0]  # noqa: E731
    np.testing.assert_allclose(run(fitted), run(original), atol=1e-3)
