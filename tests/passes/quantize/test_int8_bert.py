"""The quantize stage and CLI on the tiny exported BERT: every calibration method, formats,
lineage, bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.exporters import random_feeds
from trimformer.passes.quantize.calibrate import load_ranges
from trimformer.passes.quantize.int8 import RANGES_FILE, QuantizeConfig
from trimformer.passes.quantize.presets import host_preset
from trimformer.pipeline.stages.quantize import REPORT_FILE, QuantizeStageConfig, run_quantize


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in ModelArtifact.open(path).load_model().graph.node)


def _rel_error(a: Path, b: Path) -> float:
    feeds = random_feeds(["input_ids", "attention_mask", "token_type_ids"], 2, 12, 80, seed=5)
    outs = []
    for path in (a, b):
        session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        outs.append(session.run(None, {n: feeds[n] for n in names})[0])
    return float(np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0]))


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_each_calibration_method_on_tiny_bert(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / method
    # Batches of 8 at their natural (different) lengths.
    summary = run_quantize(
        QuantizeStageConfig(
            model=str(tiny_bert_onnx),
            out=str(out),
            calibration=str(tiny_csv),
            batch_size=8,
            quantize=QuantizeConfig(method=method, samples=40),
        )
    )
    ops = _ops(out)
    assert ops["QAttention"] == 2 and ops["MatMulIntegerToFloat"] == 6
    # The CPU kernel rewrites: residual Sum + LayerNormalization, bias inside the int8 matmul.
    assert ops["Sum"] == 4 and ops["LayerNormalization"] == 4 and ops["Gelu"] == 2
    assert not ops["SkipLayerNormalization"] and not ops["BiasGelu"]
    assert summary["calibration"]["rows"] == 40 and summary["calibration"]["method"] == method
    assert _rel_error(tiny_bert_onnx, out) < 0.1
    # The report on disk is this run's; the kept ranges load back, each one a real interval.
    on_disk = json.loads((out / REPORT_FILE).read_text())
    assert on_disk["calibration"]["rows"] == 40 and on_disk["quantized"] == summary["quantized"]
    ranges = load_ranges(out / RANGES_FILE).data
    assert ranges and all(np.all(r.range_value[0] <= r.range_value[1]) for r in ranges.values())
    step = ModelArtifact.open(out).meta.lineage[-1]
    assert step.step == "quantize" and step.params["method"] == method and step.params["preset"] == "auto"
    # "auto" is recorded as given and resolved for this CPU in the settings used.
    assert summary["settings"]["preset"] == host_preset()
    assert "float_nodes" in step.stats and "float_ops" in step.stats


def test_qdq_format_keeps_fused_attention(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "qdq"
    run_quantize(
        QuantizeStageConfig(
            model=str(tiny_bert_onnx),
            out=str(out),
            calibration=str(tiny_csv),
            quantize=QuantizeConfig(format="qdq", samples=32),
        )
    )
    ops = _ops(out)
    assert ops["Attention"] == 2 and ops["DequantizeLinear"] >= 6 and ops["SkipLayerNormalization"] == 4
    assert _rel_error(tiny_bert_onnx, out) < 0.1


def test_cli_quantize_and_cache_reuse(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(
        cli,
        [
            "--json",
            "quantize",
            str(tiny_bert_onnx),
            "--calibration",
            str(tiny_csv),
            "--samples",
            "32",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["quantized"] >= 8
    second = runner.invoke(
        cli,
        [
            "quantize",
            str(tiny_bert_onnx),
            "--calibration-cache",
            str(tmp_path / "a" / RANGES_FILE),
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert second.exit_code == 0, second.output
    a = ModelArtifact.open(tmp_path / "a").load_model()
    b = ModelArtifact.open(tmp_path / "b").load_model()
    assert [i.raw_data for i in a.graph.initializer] == [i.raw_data for i in b.graph.initializer]


def test_cli_accuracy_aware_mode(tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "--json",
            "quantize",
            str(tiny_bert_onnx),
            "--calibration",
            str(tiny_csv),
            "--samples",
            "32",
            "--eval",
            str(tiny_csv),
            "--max-accuracy-drop",
            "100",
            "--out",
            str(tmp_path / "q"),
        ],
    )
    assert result.exit_code == 0, result.output
    aware = json.loads(result.output)["accuracy_aware"]
    assert aware["returned_to_float"] == [] and aware["budget_points"] == 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "gpu"], "unknown preset 'gpu'; known presets: cpu-vnni, cpu-avx2, arm64, tensorrt"),
        (["--method", "kl"], "unknown method 'kl'; known methods: minmax, entropy, percentile"),
        (["--samples", "500"], "has 120 rows but 500 were asked for"),
        (["--max-accuracy-drop", "1"], "needs an evaluation set"),
        (["--text-column", "body"], "body"),
    ],
)
def test_cli_bad_input_exit_2_nothing_written(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "q"
    cmd = ["quantize", str(tiny_bert_onnx), "--calibration", str(tiny_csv), "--out", str(out), *args]
    result = CliRunner().invoke(cli, cmd)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_no_calibration_and_quantized_input(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    none = runner.invoke(cli, ["quantize", str(tiny_bert_onnx), "--out", str(tmp_path / "x")])
    assert none.exit_code == 2 and "needs calibration data" in none.output
    ok = runner.invoke(cli, ["quantize", str(tiny_bert_onnx), "--dynamic", "--out", str(tmp_path / "d")])
    assert ok.exit_code == 0, ok.output
    assert _ops(tmp_path / "d")["DynamicQuantizeLinear"] >= 1
    again = runner.invoke(
        cli,
        [
            "quantize",
            str(tmp_path / "d"),
            "--calibration",
            str(tiny_csv),
            "--samples",
            "32",
            "--out",
            str(tmp_path / "y"),
        ],
    )
    assert again.exit_code == 2 and "already quantized" in again.output
    assert not (tmp_path / "y").exists()


def test_pairs_for_a_model_without_segment_input_are_refused(
    tiny_plain_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q"
    result = CliRunner().invoke(
        cli,
        [
            "quantize",
            str(tiny_plain_onnx),
            "--calibration",
            str(tiny_csv),
            "--text-pair-column",
            "label",
            "--samples",
            "32",
            "--out",
            str(out),
        ],
    )
    assert (
        result.exit_code == 2
        and "sentence pairs but the model takes only input_ids, attention_mask" in result.output
    )
    assert not out.exists()
