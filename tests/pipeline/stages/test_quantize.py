"""``trimformer quantize --weight-only`` end to end on a tiny causal LM: the command line, the
lineage, and the artifact serving as the float one did (Generator, a verified bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.builders import make_causal_lm, make_csv
from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.exporters import export_model
from trimformer.runtime import MANIFEST, verify_bundle
from trimformer.runtime.generator import Generator


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-wo")
    folder = make_causal_lm(root / "llama", context=256)
    export_model(folder, root / "onnx", parity_tokens=2)
    return {"onnx": root / "onnx", "csv": make_csv(root / "t.csv", rows=80), "root": root}


def test_cli_int4_records_every_setting_and_serves(lm: dict[str, Path]) -> None:
    out = lm["root"] / "int4"
    args = ["--json", "quantize", str(lm["onnx"]), "--weight-only", "int4", "--block-size", "16"]
    args += ["--algo", "gptq", "--calibration", str(lm["csv"]), "--samples", "4", "--prompts", str(lm["csv"])]
    args += [
        "--lm-head",
        "int8",
        "--embedding",
        "int4",
        "--accuracy-level",
        "4",
        "--min-token-agreement",
        "0",
    ]
    args += ["--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["matmul_nbits"] == 15 and summary["size_mb"] < summary["input_size_mb"]
    assert summary["fidelity"]["prompts"] >= 1 and summary["target"].startswith("x86")
    step = ModelArtifact.open(out).meta.lineage[-1]
    assert step.step == "weight-only"
    expected = {"bits": 4, "algo": "gptq", "block_size": 16, "symmetric": True, "lm_head": "int8"}
    expected |= {"embedding": "int4", "accuracy_level": 4, "samples": 4, "calibration": str(lm["csv"])}
    expected |= {"min_token_agreement": 0.0}
    assert expected.items() <= step.params.items() and step.params["target"] == summary["target"]
    assert step.stats["fidelity"] == summary["fidelity"]
    assert json.loads((out / "quantization_report.json").read_text())["matmul_nbits"] == 15

    # The int4 artifact generates, and packages into a bundle whose greedy smoke record verifies.
    text = Generator(out).generate("the car", max_new_tokens=4)[0]
    assert len(text.token_ids) == 4
    bundle = lm["root"] / "bundle"
    assert CliRunner().invoke(cli, ["--quiet", "package", str(out), "--out", str(bundle)]).exit_code == 0
    verify_bundle(bundle)  # re-walks the recorded greedy tokens through the int4 graph
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["model"]["quantized"] and manifest["smoke"]["kind"] == "greedy-tokens"
    assert manifest["lineage"]["steps"][-1]["step"] == "weight-only"


def test_defaults_and_the_accuracy_level_chosen_by_parity_and_speed(lm: dict[str, Path]) -> None:
    out = lm["root"] / "default"
    result = CliRunner().invoke(
        cli, ["--json", "quantize", str(lm["onnx"]), "--weight-only", "int8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["settings"] == {
        "bits": 8,
        "algo": "rtn",
        "block_size": 32,
        "symmetric": True,
        "lm_head": "int8",
        "embedding": "float",
        "accuracy_level": "auto",
        "min_token_agreement": 0.95,
        "samples": 128,
        "new_tokens": 32,
    }
    # Built-in prompts without --prompts: 24 of them, as the export's parity.
    assert summary["fidelity"]["prompts"] == 24
    # Every level was tried: measured, or found to be the same kernel as one measured.
    levels = summary["accuracy_levels"]
    assert set(levels) == {"1", "2", "3", "4"} and "token_agreement" in levels["1"]
    measured = {k: f for k, f in levels.items() if "same_as" not in f}
    assert all(str(f["same_as"]) in measured for f in levels.values() if "same_as" in f)
    # The fastest level whose agreement meets the floor is kept, and written on every node.
    meeting = {k: f["decode_tokens_per_s"] for k, f in measured.items() if f["token_agreement"] >= 0.95}
    chosen = summary["accuracy_level"]
    assert str(chosen) == max(meeting, key=meeting.get)
    assert summary["fidelity"]["token_agreement"] == levels[str(chosen)]["token_agreement"]
    graph = ModelArtifact.open(out).load_model()
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nodes} == {chosen}
    step = ModelArtifact.open(out).meta.lineage[-1]
    assert step.params["accuracy_level"] == "auto" and step.stats["accuracy_level"] == chosen
    assert step.stats["accuracy_levels"] == levels


def test_under_the_agreement_floor_nothing_is_written(lm: dict[str, Path]) -> None:
    out = lm["root"] / "refused"
    args = ["quantize", str(lm["onnx"]), "--weight-only", "int4", "--lm-head", "int4", "--block-size", "256"]
    result = CliRunner().invoke(cli, [*args, "--min-token-agreement", "0.999", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "no accuracy_level of the quantized graph keeps token agreement >= 0.999" in result.output
    assert "level 1: " in result.output and "level 4: " in result.output
    assert not out.exists()
