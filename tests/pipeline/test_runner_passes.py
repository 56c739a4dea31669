"""The real prune, fuse and quantize stages run through the recipe runner on a tiny BERT:
heads and neurons really go, every layer stays fused through int8, each step records the target,
and the run report's pruning map is the record the prune stage wrote."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest

from tests.builders import make_hf_model
from tests.pipeline.runner_support import tiny_recipe_text, write_recipe
from trimformer.artifact import ModelArtifact
from trimformer.formats.pruning_record import kept_per_layer, load_pruning_record
from trimformer.pipeline.context import host_target
from trimformer.pipeline.recipe import load_recipe
from trimformer.pipeline.runner import RunResult, run_recipe


def _ops(folder: Path) -> Counter[str]:
    return Counter(n.op_type for n in ModelArtifact.open(folder).load_model().graph.node)


def _query_widths(folder: Path) -> list[int]:
    """Output width of each layer's query projection (heads kept x head_dim)."""
    model = ModelArtifact.open(folder).load_model()
    weights = {t.name: t for t in model.graph.initializer}
    widths = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and "query" in node.name and node.input[1] in weights:
            widths.append(int(weights[node.input[1]].dims[1]))
    return widths


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path) -> RunResult:
    tmp = tmp_path_factory.mktemp("recipe-passes")
    make_hf_model(tmp / "src", layers=3, hidden=64, heads=4, ffn=128)
    passes = [
        {"name": "prune", "heads": 0.25, "ffn": 0.3, "min_heads": 1},
        {"name": "trim-vocab"},
        {"name": "fuse"},
        {"name": "quantize"},
    ]
    recipe = load_recipe(write_recipe(tmp, tiny_recipe_text(tmp / "src", tiny_csv, passes=passes)))
    return run_recipe(recipe, tmp / "wd")


def _stage(run: RunResult, name: str) -> Path:
    return next(p.out for p in run.stages if p.name == name)


def test_prune_removes_heads_and_neurons_it_records(run: RunResult) -> None:
    record = load_pruning_record(_stage(run, "prune"))
    layers = kept_per_layer(record)
    assert sum(layer["heads_kept"] for layer in layers) == 9  # 3 of 12 heads removed
    assert all(layer["heads_kept"] >= 1 for layer in layers)
    assert sum(layer["ffn_kept"] for layer in layers) < 3 * 128
    # The graph really shrank: each query projection is as wide as the heads it kept.
    head_dim = record["head_dim"]
    assert _query_widths(_stage(run, "export")) == [4 * head_dim] * 3
    assert _query_widths(_stage(run, "prune")) == [layer["heads_kept"] * head_dim for layer in layers]


def test_every_layer_stays_fused_through_int8(run: RunResult) -> None:
    fused, int8 = _ops(_stage(run, "fuse")), _ops(_stage(run, "quantize"))
    assert fused["Attention"] == 3 and fused["EmbedLayerNormalization"] == 1
    assert int8["QAttention"] == 3 and int8["QEmbedLayerNormalization"] == 1
    model = ModelArtifact.open(_stage(run, "quantize")).load_model()
    embedding = next(n for n in model.graph.node if n.op_type == "QEmbedLayerNormalization")
    weights = {t.name: t for t in model.graph.initializer}
    assert weights[embedding.input[2]].data_type == onnx.TensorProto.UINT8  # the word table


def test_the_vocabulary_trimmed_before_fusion_is_the_one_quantized(run: RunResult) -> None:
    from tokenizers import Tokenizer

    trimmed = _stage(run, "trim-vocab")
    vocab = Tokenizer.from_file(str(trimmed / "tokenizer.json")).get_vocab_size()
    exported = Tokenizer.from_file(str(_stage(run, "export") / "tokenizer.json")).get_vocab_size()
    assert vocab < exported
    quantized = _stage(run, "quantize")
    assert (quantized / "tokenizer.json").read_bytes() == (trimmed / "tokenizer.json").read_bytes()
    model = ModelArtifact.open(quantized).load_model()
    embedding = next(n for n in model.graph.node if n.op_type == "QEmbedLayerNormalization")
    table = next(t for t in model.graph.initializer if t.name == embedding.input[2])
    assert table.dims[0] == vocab


def test_each_step_records_the_target(run: RunResult) -> None:
    lineage = ModelArtifact.open(_stage(run, "quantize")).meta.lineage
    steps = {step.step: step.params for step in lineage if step.step != "export"}
    assert set(steps) == {"prune", "trim-vocab", "fuse", "quantize"}
    assert {params["target"] for params in steps.values()} == {host_target().name}


def test_the_report_maps_the_record_the_prune_stage_wrote(run: RunResult) -> None:
    assert run.report_dir is not None
    report = json.loads((run.report_dir / "report.json").read_text())
    record = load_pruning_record(_stage(run, "prune"))
    assert report["pruning"] == [{"stage": "prune", "layers": kept_per_layer(record)}]
    assert report["target"] == host_target().name
    assert (run.report_dir / "pruning-prune.png").is_file()
