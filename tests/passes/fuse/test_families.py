"""Fusion that survives pruning, for every encoder family: each attention layer's head count is
written into its head-split Reshape, so onnxruntime fuses every layer however many heads it kept."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from tests.builders import make_hf_model
from trimformer.artifact import ModelArtifact
from trimformer.exporters import export_model
from trimformer.passes.fuse.fusion import in_scratch_dir, pin_head_counts
from trimformer.passes.prune.structured import PruneConfig
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.pipeline.stages.prune import PruneStageConfig, run_prune
from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_fuse, run_quantize

FAMILIES = ["bert", "distilbert", "roberta", "xlm-roberta"]


def _ops(folder: Path) -> Counter[str]:
    return Counter(n.op_type for n in ModelArtifact.open(folder).load_model().graph.node)


def _attention_count(model: onnx.ModelProto, tmp: Path) -> int:
    """Attention nodes onnxruntime fuses when it must read every layer's head count from the graph
    (what a pruned model with a count per layer gets: no global num_heads)."""
    from onnxruntime.transformers.optimizer import optimize_model

    work = onnx.ModelProto()
    work.CopyFrom(model)  # optimize_model rewrites the model it is given
    with in_scratch_dir(tmp):
        fused = optimize_model(work, model_type="bert", num_heads=0, hidden_size=0, opt_level=0).model
    return sum(n.op_type == "Attention" for n in fused.graph.node)


@pytest.mark.parametrize("family", FAMILIES)
def test_pinned_head_counts_let_every_layer_fuse(family: str, tmp_path: Path) -> None:
    make_hf_model(tmp_path / "src", model_type=family, layers=2, hidden=64, heads=4, ffn=128)
    export_model(tmp_path / "src", tmp_path / "onnx")
    model = ModelArtifact.open(tmp_path / "onnx").load_model()
    # The export infers the count at run time (-1): onnxruntime cannot fuse without a global one.
    assert _attention_count(model, tmp_path) == 0
    assert pin_head_counts(model) == 6  # q, k and v of both layers
    assert _attention_count(model, tmp_path) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_fuse_quantize_keeps_every_fusion(family: str, tmp_path: Path, tiny_csv: Path) -> None:
    make_hf_model(tmp_path / "src", model_type=family, layers=3, hidden=64, heads=4, ffn=128)
    export_model(tmp_path / "src", tmp_path / "onnx")
    run_prune(
        PruneStageConfig(
            model=str(tmp_path / "onnx"),
            out=str(tmp_path / "pruned"),
            prune=PruneConfig(heads=0.25, ffn=0.3, min_heads=1),
            calibration=str(tiny_csv),
            samples=32,
        )
    )
    heads = ModelArtifact.open(tmp_path / "pruned").meta.extras["pruning"]["num_heads"]
    assert sum(heads) < 12  # some heads really went
    fused = {}
    for name in ("onnx", "pruned"):
        run_fuse(str(tmp_path / name), str(tmp_path / f"{name}-fused"))
        quantize = QuantizeConfig(samples=16)
        run_quantize(
            QuantizeStageConfig(
                model=str(tmp_path / name),
                out=str(tmp_path / f"{name}-int8"),
                calibration=str(tiny_csv),
                quantize=quantize,
            )
        )
        fused[name] = (_ops(tmp_path / f"{name}-fused"), _ops(tmp_path / f"{name}-int8"))
    for ops_fused, ops_int8 in fused.values():
        assert ops_fused["Attention"] == 3 and ops_int8["QAttention"] == 3
    # The pruned graph fuses exactly as the unpruned one does.
    keys = ("Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu")
    assert [fused["pruned"][0][k] for k in keys] == [fused["onnx"][0][k] for k in keys]
    keys_int8 = ("QAttention", "QEmbedLayerNormalization", "MatMulIntegerToFloat")
    assert [fused["pruned"][1][k] for k in keys_int8] == [fused["onnx"][1][k] for k in keys_int8]
    # The word-embedding table in 8 bits: in QEmbedLayerNormalization where onnxruntime fuses the
    # embeddings (BERT, DistilBERT), else as GatherBlockQuantized (RoBERTa, XLM-R: position ids from the mask).
    for name in ("onnx", "pruned"):
        ops_int8 = fused[name][1]
        assert ops_int8["QEmbedLayerNormalization"] + ops_int8["GatherBlockQuantized"] == 1
        graph = ModelArtifact.open(tmp_path / f"{name}-int8").load_model().graph
        inits = {init.name: init for init in graph.initializer}
        word = [
            inits[n.input[2] if n.op_type == "QEmbedLayerNormalization" else n.input[0]]
            for n in graph.node
            if n.op_type in ("QEmbedLayerNormalization", "GatherBlockQuantized")
        ]
        assert [t.data_type for t in word] == [onnx.TensorProto.UINT8] and list(word[0].dims)[1] == 64
