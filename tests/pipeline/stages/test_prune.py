"""The prune stage finds the PyTorch model an artifact was exported from, so that Fisher importance
and block reconstruction run without --source, and only while that folder holds the same files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from tests.builders import make_hf_model
from trimformer.artifact import ModelArtifact
from trimformer.errors import UserError
from trimformer.exporters import export_model
from trimformer.passes.prune.structured import PruneConfig
from trimformer.pipeline.stages.prune import PruneStageConfig, exported_from, run_prune


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path]:
    make_hf_model(tmp_path / "src")
    export_model(tmp_path / "src", tmp_path / "onnx")
    return tmp_path / "src", tmp_path / "onnx"


def _prune(model: Path, data: Path, out: Path, importance: str = "auto") -> dict:
    config = PruneConfig(flops=0.4, importance=importance, block_steps=20)  # type: ignore[arg-type]
    return run_prune(
        PruneStageConfig(model=str(model), out=str(out), calibration=str(data), samples=16, prune=config)
    )


def test_the_export_records_its_source_and_prune_uses_it(
    exported: tuple[Path, Path], tiny_csv: Path, tmp_path: Path
) -> None:
    src, onnx_dir = exported
    assert exported_from(ModelArtifact.open(onnx_dir)) == str(src.resolve())
    summary = _prune(onnx_dir, tiny_csv, tmp_path / "pruned")
    assert summary["importance"] == "fisher"
    assert any(step["method"] == "gradient" for step in summary["reconstruction"])  # block reconstruction
    lineage = ModelArtifact.open(tmp_path / "pruned").meta.lineage
    assert lineage[-1].params["source"] == str(src.resolve())


def test_a_changed_source_folder_is_not_used(
    exported: tuple[Path, Path], tiny_csv: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, onnx_dir = exported
    make_hf_model(src, seed=1)  # other weights in the same folder
    assert exported_from(ModelArtifact.open(onnx_dir)) is None
    with caplog.at_level(logging.WARNING):
        summary = _prune(onnx_dir, tiny_csv, tmp_path / "pruned")
    assert summary["importance"] == "activation"
    assert all(step["method"] == "ridge" for step in summary["reconstruction"])
    assert "no PyTorch source" in caplog.text
    with pytest.raises(UserError, match="importance 'fisher' needs the PyTorch model"):
        _prune(onnx_dir, tiny_csv, tmp_path / "fisher", importance="fisher")
    assert not (tmp_path / "fisher").exists()


def test_a_moved_source_folder_is_not_used(exported: tuple[Path, Path]) -> None:
    src, onnx_dir = exported
    shutil.move(src, src.with_name("moved"))
    assert exported_from(ModelArtifact.open(onnx_dir)) is None
