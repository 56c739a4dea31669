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
    args += ["--lm-head", "int8", "--embedding", "int4", "--accuracy-level", "4", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["matmul_nbits"] == 15 and summary["size_mb"] < summary["input_size_mb"]
    assert summary["fidelity"]["prompts"] >= 1 and summary["target"].startswith("x86")
    step = ModelArtifact.open(out).meta.lineage[-1]
    assert step.step == "weight-only"
    expected = {"bits": 4, "algo": "gptq", "block_size": 16, "symmetric": True, "lm_head": "int8"}
    expected |= {"embedding": "int4", "accuracy_level": 4, "samples": 4, "calibration": str(lm["csv"])}
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


def test_settings_default_to_rtn_symmetric_with_an_int8_head(lm: dict[str, Path]) -> None:
    out = lm["root"] / "default"
    result = CliRunner().invoke(
        cli, ["--json", "quantize", str(lm["onnx"]), "--weight-only", "int8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output)["settings"]
    assert settings == {
        "bits": 8,
        "algo": "rtn",
        "block_size": 32,
        "symmetric": True,
        "lm_head": "int8",
        "embedding": "float",
        "accuracy_level": 0,
        "samples": 128,
        "new_tokens": 32,
    }
    # Built-in prompts without --prompts: 24 of them, as the export's parity.
    assert json.loads(result.output)["fidelity"]["prompts"] == 24
