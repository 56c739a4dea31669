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
        (["--embedding", "int2"], "embedding: must be one of int8, int4, auto (got 'int2')"),
        (
            ["--embedding", "auto"],
            "embedding auto picks int4 or int8 by the accuracy budget; give max_accuracy_drop",
        ),
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


def _word_table(path: Path) -> tuple[str, int, int]:
    """(op, bits, bytes) of the node that reads the word table by input_ids."""
    model = ModelArtifact.open(path).load_model()
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized" and node.input[1] == "input_ids":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            return node.op_type, bits, len(weights[node.input[0]].raw_data)
        if node.op_type == "QEmbedLayerNormalization":
            return node.op_type, 8, len(weights[node.input[2]].raw_data)
    raise AssertionError("no quantized word table")


def test_a_4_bit_word_table_leaves_the_embedding_unfused(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    common = ["quantize", str(tiny_bert_onnx), "--calibration", str(tiny_csv), "--samples", "32"]
    for name, extra in (("int8", []), ("int4", ["--embedding", "int4"])):
        result = CliRunner().invoke(cli, [*common, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    op8, bits8, bytes8 = _word_table(tmp_path / "int8")
    op4, bits4, bytes4 = _word_table(tmp_path / "int4")
    assert (op8, bits8) == ("QEmbedLayerNormalization", 8)
    assert (op4, bits4) == ("GatherBlockQuantized", 4) and bytes4 * 2 == bytes8
    ops = _ops(tmp_path / "int4")
    assert (
        ops["QAttention"] == 2
        and "EmbedLayerNormalization" not in ops
        and "QEmbedLayerNormalization" not in ops
    )
    assert _rel_error(tiny_bert_onnx, tmp_path / "int4") < 0.1
    assert ModelArtifact.open(tmp_path / "int4").meta.lineage[-1].params["embedding"] == "int4"


def test_the_auto_word_table_follows_the_accuracy_budget(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trimformer.pipeline.context as context

    real = context.onnx_accuracy_fn

    def penalised(*args: object) -> object:
        # A forced failure: any graph with a 4-bit table scores 3 points lower.
        evaluate = real(*args)  # type: ignore[arg-type]

        def score(model: object) -> float:
            four = any(
                n.op_type == "GatherBlockQuantized"
                and any(a.name == "bits" and a.i == 4 for a in n.attribute)
                for n in model.graph.node  # type: ignore[attr-defined]
            )
            return evaluate(model) - (0.03 if four else 0.0)

        return score

    monkeypatch.setattr(context, "onnx_accuracy_fn", penalised)
    chosen = {}
    for budget in ("5", "1"):
        out = tmp_path / budget
        args = ["--json", "quantize", str(tiny_bert_onnx), "--calibration", str(tiny_csv), "--samples", "32"]
        args += [
            "--eval",
            str(tiny_csv),
            "--max-accuracy-drop",
            budget,
            "--embedding",
            "auto",
            "--out",
            str(out),
        ]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        chosen[budget] = _word_table(out)[1]
        report = json.loads((out / REPORT_FILE).read_text())["word_table"]
        assert report["bits"] == chosen[budget] and report["chosen_by"] == "accuracy budget"
        assert report["drop_points_with_4bit_table"] >= 3.0 - 1e-6
    assert chosen == {"5": 4, "1": 8}
