from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.builders import make_causal_lm
from trimformer.cli.commands import cli
from trimformer.exporters import export_model


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "llama"
    export_model(make_causal_lm(tmp_path_factory.mktemp("src") / "llama"), out, parity_tokens=2)
    return out


def test_generate_json_and_stream_give_the_same_text(llama_onnx: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "--json",
            "generate",
            str(llama_onnx),
            "--prompt",
            "the car",
            "--prompt",
            "good",
            "--max-new-tokens",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["generations"]
    assert [r["prompt"] for r in rows] == ["the car", "good"]
    assert all(r["tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in rows)
    streamed = runner.invoke(
        cli, ["generate", str(llama_onnx), "--prompt", "the car", "--max-new-tokens", "8", "--stream"]
    )
    assert streamed.exit_code == 0 and streamed.output == "the car" + rows[0]["text"] + "\n"
