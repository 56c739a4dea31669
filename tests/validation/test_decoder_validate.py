from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.builders import make_causal_lm, make_csv
from trimformer.artifact import ModelArtifact
from trimformer.errors import GateFailed, UserError
from trimformer.exporters import export_model
from trimformer.pipeline.stages.validate import run_validate
from trimformer.validation.decoder import DecoderValidateConfig, onnx_decoder, perplexity
from trimformer.validation.validate import ValidateConfig


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    folder = make_causal_lm(root / "llama", context=640)
    other = make_causal_lm(root / "other", context=640, seed=1)
    out, other_out = root / "onnx", root / "other-onnx"
    export_model(folder, out, parity_tokens=2)
    export_model(other, other_out, parity_tokens=2)
    return {"folder": folder, "onnx": out, "other": other_out, "csv": make_csv(root / "t.csv", rows=80)}


def _config(lm: dict[str, Path], tmp_path: Path, reference: str | None, **gates: float) -> ValidateConfig:
    decoder = DecoderValidateConfig(
        perplexity_context=64, perplexity_tokens=400, prompts=4, new_tokens=6, runs=2, **gates
    )
    return ValidateConfig(
        model=str(lm["onnx"]),
        data=str(lm["csv"]),
        reference=reference,
        out=str(tmp_path / "r"),
        decoder=decoder,
    )


def test_report_against_the_pytorch_source(lm: dict[str, Path], tmp_path: Path) -> None:
    report = run_validate(_config(lm, tmp_path, str(lm["folder"]), min_token_agreement=0.99))
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk["task"] == "causal-lm" and on_disk["gates"]["passed"]
    # The export equals its source: the same greedy tokens, no divergence, the same perplexity.
    assert report["token_agreement"] == 1.0 and report["kl"] < 1e-6 and report["tokens"] == 24
    assert abs(report["perplexity_increase_pct"]) < 1e-3
    assert set(report["decode_tokens_per_s"]) == {"128", "512"} and report["prompt_latency_ms"] > 0
    assert report["perplexity_context"] == 64 and report["reference"]["perplexity"] > 1
    assert "Greedy-token agreement with the reference: 1.0000" in (tmp_path / "r" / "report.md").read_text()


def test_a_different_model_fails_the_agreement_gate(lm: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(GateFailed, match="min_token_agreement"):
        run_validate(_config(lm, tmp_path, str(lm["other"]), min_token_agreement=0.99))
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["token_agreement"] < 0.99 and report["kl"] > 0.01 and not report["gates"]["passed"]


def test_sliding_window_scores_each_token_once(lm: dict[str, Path]) -> None:
    runner = onnx_decoder(ModelArtifact.open(lm["onnx"]), threads=1)
    stream = np.random.default_rng(0).integers(3, 300, size=90).astype(np.int64)
    # One window over everything is the plain perplexity; smaller windows differ only by context.
    whole = perplexity(runner, stream, 90)
    logits, _ = runner.prompt(stream[None], np.ones((1, 90), dtype=np.int64))
    shifted = logits[0, :-1] - logits[0, :-1].max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    assert whole == pytest.approx(float(np.exp(-log_probs[np.arange(89), stream[1:]].mean())), rel=1e-5)
    assert perplexity(runner, stream, 32) > 1


def test_gates_need_a_reference_and_encoder_gates_are_refused(lm: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="compare against a reference; pass --reference"):
        run_validate(_config(lm, tmp_path, None, min_token_agreement=0.9))
    config = _config(lm, tmp_path, str(lm["folder"]))
    config.max_accuracy_drop = 1.0
    with pytest.raises(UserError, match="are encoder gates; a causal LM takes"):
        run_validate(config)
    with pytest.raises(UserError, match=r"--min-token-agreement is a share in \[0, 1\]"):
        run_validate(_config(lm, tmp_path, str(lm["folder"]), min_token_agreement=95.0))
