"""The CPU kernel rewrites (split SkipLayerNorm, bias into the int8 matmul, bounded attention mask)
change which onnxruntime kernels run, never the numbers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from trimformer.artifact import ModelArtifact
from trimformer.passes.fuse.cpu_kernels import MASK_FILTER_VALUE, prefer_cpu_kernels
from trimformer.passes.fuse.fusion import FuseConfig
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_fuse, run_quantize


def _padded_feeds(session: ort.InferenceSession, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if "mask" in i.name:
            mask = np.ones((batch, seq), dtype=np.int64)
            for row in range(batch):
                mask[row, rng.integers(1, seq) :] = 0
            feeds[i.name] = mask
        elif "type" in i.name:
            feeds[i.name] = np.zeros((batch, seq), dtype=np.int64)
        else:
            feeds[i.name] = rng.integers(5, 80, size=(batch, seq), dtype=np.int64)
    return feeds


def _outputs(model: onnx.ModelProto, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, _padded_feeds(session, b, s, seed=b * 100 + s))[0] for b, s in shapes]


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
    after = onnx.ModelProto()
    after.CopyFrom(before)
    counts = prefer_cpu_kernels(after)
    ops = Counter(n.op_type for n in after.graph.node)
    assert counts["skip_layer_norm_split"] == 4 and not ops["SkipLayerNormalization"]
    assert ops["Sum"] == 4 and ops["LayerNormalization"] == 4
    assert counts["mask_filter_bounded"] == 2
    attention = [n for n in after.graph.node if n.op_type in ("Attention", "QAttention")]
    assert all(
        any(a.name == "mask_filter_value" and a.f == MASK_FILTER_VALUE for a in n.attribute)
        for n in attention
    )
    if quantized:
        # The bias of every BiasGelu and SkipLayerNorm moved into its int8 matmul.
        assert counts["bias_gelu_folded"] == 2 and ops["Gelu"] == 2 and not ops["BiasGelu"]
        assert not ops["Add"]
    for ref, got in zip(_outputs(before, SHAPES), _outputs(after, SHAPES), strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_the_rewrites_are_idempotent(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    run_fuse(str(tiny_bert_onnx), str(tmp_path / "f"), FuseConfig())
    model = ModelArtifact.open(tmp_path / "f").load_model()
    assert prefer_cpu_kernels(model) == {
        "bias_gelu_folded": 0,
        "skip_layer_norm_split": 0,
        "mask_filter_bounded": 0,
    }


def test_gpu_targets_keep_the_fused_kernels(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path) -> None:
    run_quantize(
        QuantizeStageConfig(
            model=str(tiny_bert_onnx),
            out=str(tmp_path / "trt"),
            calibration=str(tiny_csv),
            quantize=QuantizeConfig(preset="tensorrt", samples=16),
        )
    )
    ops = Counter(n.op_type for n in ModelArtifact.open(tmp_path / "trt").load_model().graph.node)
    assert ops["SkipLayerNormalization"] == 4 and not ops["Sum"]
