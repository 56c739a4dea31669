"""The built-in causal LM end to end, as a user runs it: train on the tweets, export with greedy-token
parity on the test split, validate against PyTorch with gates, generate. Shorter training than
`make lm` (the checks are the same)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trimformer.cli.commands import cli

pytestmark = pytest.mark.slow


def _run(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["--quiet", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


def test_builtin_lm_train_export_validate_generate(tmp_path: Path) -> None:
    lm, onnx_dir = tmp_path / "lm", tmp_path / "lm-onnx"
    trained = _run("train", "--task", "causal-lm", "--data", "builtin:tweets", "--out", str(lm),
                   "--steps", "120", "--eval-every", "60", "--vocab-size", "2048")  # fmt: skip
    # Learned from the train split: far below the unigram model of the same dev tokens.
    assert trained["dev_perplexity"] < 0.5 * trained["unigram_dev_perplexity"]
    assert trained["parameters"] > 2_000_000
    exported = _run("export", str(lm), "--out", str(onnx_dir), "--prompts", "builtin:tweets")
    greedy = exported["greedy_parity"]
    assert greedy["prompts"] >= 20 and greedy["new_tokens"] == 32 and greedy["greedy_tokens_equal"]
    report = _run("validate", str(onnx_dir), "--data", "builtin:tweets", "--reference", str(lm),
                  "--perplexity-context", "128", "--perplexity-tokens", "4096", "--min-token-agreement", "0.99",
                  "--max-perplexity-increase", "0.5", "--out", str(tmp_path / "report"))  # fmt: skip
    assert report["task"] == "causal-lm" and report["gates"]["passed"]
    assert report["token_agreement"] >= 0.99 and report["perplexity"] < trained["unigram_dev_perplexity"]
    generated = _run("generate", str(onnx_dir), "--prompt", "I love my new", "--max-new-tokens", "12")
    row = generated["generations"][0]
    assert 1 <= row["tokens"] <= 12 and row["text"]
