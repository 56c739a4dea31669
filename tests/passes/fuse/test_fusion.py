"""The fuse pass on the tiny exported BERT: counts per fusion, numbers unchanged, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx_ir as ir
import pytest
from click.testing import CliRunner

from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.errors import ParityError
from trimformer.passes.base import PassContext, apply_pass
from trimformer.passes.fuse.fusion import FuseConfig, FusePass, detect_attention_dims
from trimformer.pipeline.stages.quantize import run_fuse


def test_detects_heads_from_the_torchscript_export(tiny_bert_onnx: Path) -> None:
    art = ModelArtifact.open(tiny_bert_onnx)
    assert detect_attention_dims(art.load_model()) == (4, 32)


def test_fuse_pass_counts_each_fusion_and_keeps_the_numbers(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    art = ModelArtifact.open(tiny_bert_onnx)
    # Heads detected from the graph (no config given to the pass).
    report = FusePass(FuseConfig(), PassContext(scratch=tmp_path))(ir.from_proto(art.load_model()))
    stats = report.stats
    assert stats["fusions"]["Attention"] == 2
    assert stats["fusions"]["SkipLayerNormalization"] == 4
    assert stats["fusions"]["BiasGelu"] == 2
    assert stats["fusions"]["EmbedLayerNormalization"] == 1
    assert stats["fully_fused"] and stats["dims_detected"]
    assert stats["max_abs_diff"] < 1e-3
    ops = Counter(n.op_type for n in ir.to_proto(report.model).graph.node)
    assert ops["Attention"] == 2 and ops["Softmax"] == 0


def test_fuse_in_a_pass_list_writes_lineage(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    art = ModelArtifact.open(tiny_bert_onnx)
    out, report = apply_pass(art, "fuse", FuseConfig(), PassContext(scratch=tmp_path), tmp_path / "fused")
    step = out.meta.lineage[-1]
    assert step.step == "fuse" and step.stats["fusions"]["Attention"] == 2
    assert report.modified


def test_fuse_cli(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--json", "fuse", str(tiny_bert_onnx), "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["fusions"]["Attention"] == 2
    again = runner.invoke(cli, ["fuse", str(tiny_bert_onnx), "--out", str(tmp_path / "f")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_fuse_plain_model_reports_what_it_found(tiny_plain_onnx: Path, tmp_path: Path) -> None:
    stats = run_fuse(str(tiny_plain_onnx), str(tmp_path / "p"))
    assert stats["max_abs_diff"] < 1e-3
    # The residual LayerNorms and the bias + GELU fuse; its hand-written attention is not the pattern
    # the Attention fusion knows, and the report says so instead of claiming a fully fused graph.
    assert stats["fusions"] == {"SkipLayerNormalization": 4, "BiasGelu": 2}
    assert stats["dims_detected"] and not stats["fully_fused"]


@pytest.mark.parametrize("bad", ["missing"])
def test_fuse_refuses_missing_model(tmp_path: Path, bad: str) -> None:
    result = CliRunner().invoke(cli, ["fuse", str(tmp_path / bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_fuse_check_runs_in_ensures_on_the_model_it_is_given(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    the_pass = FusePass(FuseConfig(), PassContext(scratch=tmp_path))
    report = the_pass(ir.from_proto(ModelArtifact.open(tiny_bert_onnx).load_model()))
    assert report.stats["max_abs_diff"] < 1e-3
    # A fused graph that computes something else (the classifier's bias shifted by 1).
    bias = [n for n in report.model.graph if n.op_type == "Gemm"][-1].inputs[2]
    assert bias is not None and bias.const_value is not None
    bias.const_value = ir.tensor(bias.const_value.numpy() + 1, name=bias.name)
    with pytest.raises(ParityError, match="the fused graph differs from the input graph"):
        the_pass.ensures(report.model)
