from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trimformer.errors import UserError
from trimformer.exporters import export_model
from trimformer.training.finetune import TrainConfig, train


def _config(model: Path, data: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {"steps": 12, "batch_size": 8, "max_length": 16, "eval_every": 4, "lr": 5e-4}
    base.update(kw)
    return TrainConfig(model=str(model), data=str(data), out=str(out), **base)  # type: ignore[arg-type]


def test_training_learns_and_writes_an_exportable_folder(
    tiny_bert: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    result = train(_config(tiny_bert, tiny_csv, tmp_path / "t", steps=40, eval_every=10))
    assert result.labels == ["negative", "neutral", "positive"]
    assert len(result.history) == 4
    assert result.best_dev_accuracy == max(h["dev_accuracy"] for h in result.history)
    assert result.history[0]["loss"] > result.history[-1]["loss"]
    record = json.loads((tmp_path / "t" / "trimformer_train.json").read_text())
    assert record["result"]["best_step"] == result.best_step
    # The trained folder exports: the ONNX model computes what the trained one does, same labels.
    exported = export_model(tmp_path / "t", tmp_path / "onnx")
    assert exported.parity.worst < 1e-4 and exported.artifact.labels == result.labels


def test_training_is_deterministic_under_a_seed(tiny_bert: Path, tiny_csv: Path, tmp_path: Path) -> None:
    train(_config(tiny_bert, tiny_csv, tmp_path / "a", seed=7))
    train(_config(tiny_bert, tiny_csv, tmp_path / "b", seed=7))
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_model_trains(tiny_plain: Path, tiny_csv: Path, tmp_path: Path) -> None:
    result = train(_config(tiny_plain, tiny_csv, tmp_path / "p"))
    assert (tmp_path / "p" / "trimformer_model.json").is_file() and result.steps == 12


def test_unlabelled_data_and_bad_options_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    data = tmp_path / "u.csv"
    data.write_text("text\n" + "\n".join(f"row {i}" for i in range(20)) + "\n")
    with pytest.raises(UserError, match="has no labels"):
        train(_config(tiny_bert, data, tmp_path / "o"))
    with pytest.raises(UserError, match="--steps must be at least 1"):
        train(_config(tiny_bert, data, tmp_path / "o", steps=0))
    assert not (tmp_path / "o").exists()
