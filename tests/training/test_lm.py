from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trimformer.training.lm as lm
from tests.builders import make_csv
from trimformer.errors import UserError
from trimformer.sources import load_source
from trimformer.training.lm import LMConfig, LMShape, train_causal_lm

TINY = LMShape(hidden_size=32, layers=2, heads=4, kv_heads=2, ffn_size=48, context_length=64)


def _config(tmp_path: Path, out: str = "lm", **overrides: object) -> LMConfig:
    data = make_csv(tmp_path / "corpus.csv", rows=300)
    settings: dict[str, object] = {
        "data": str(data), "out": str(tmp_path / out), "steps": 40, "batch_size": 8, "max_length": 16,
        "lr": 1e-2, "eval_every": 20, "vocab_size": 300, "shape": TINY, "save_every": 5,
    }  # fmt: skip
    settings.update(overrides)
    return LMConfig(**settings)  # type: ignore[arg-type]


def test_trains_a_gqa_llama_and_a_tokenizer_that_transformers_loads(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    result = train_causal_lm(_config(tmp_path))
    out = tmp_path / "lm"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer("good day")["input_ids"][0] == tokenizer.bos_token_id
    source = load_source(out)
    spec = source.config["trimformer_decoder"]
    assert spec["family"] == "llama" and spec["num_kv_heads"] < spec["num_heads"]
    # The model learned the corpus: far below a unigram model of the same tokens on the dev split.
    assert result.dev_perplexity < 0.7 * result.unigram_dev_perplexity
    record = json.loads((out / "trimformer_train.json").read_text())
    assert record["task"] == "causal-lm" and record["result"]["dev_perplexity"] == result.dev_perplexity
    assert [h["step"] for h in record["result"]["history"]] == [20, 40]
    assert not (tmp_path / ".lm.checkpoint").exists()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_causal_lm(_config(tmp_path, out="straight", steps=12, eval_every=6))
    straight = load_source(tmp_path / "straight").model.state_dict()

    real_steps = lm._steps

    def interrupting(model, train, config):  # type: ignore[no-untyped-def]
        step = real_steps(model, train, config)

        def maybe_stop(number: int) -> list[dict[str, float]]:
            if number == 8:
                raise KeyboardInterrupt
            return step(number)

        return maybe_stop

    config = _config(tmp_path, out="resumed", steps=12, eval_every=6)
    monkeypatch.setattr(lm, "_steps", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train_causal_lm(config)
    assert (tmp_path / ".resumed.checkpoint" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    monkeypatch.setattr(lm, "_steps", real_steps)
    result = train_causal_lm(config)
    assert result.resumed_from == 7
    resumed = load_source(tmp_path / "resumed").model.state_dict()
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


def test_bad_vocab_size_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--vocab-size must be in"):
        train_causal_lm(_config(tmp_path, vocab_size=10))
