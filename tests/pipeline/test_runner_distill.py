"""A recipe with [distill]: the student is exported and validated against the teacher's export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pipeline.runner_support import tiny_recipe_text, write_recipe
from trimformer.pipeline.recipe import load_recipe
from trimformer.pipeline.runner import run_recipe

DISTILL = "[distill]\nlayers = '1'\nsteps = 2\nbatch_size = 8\neval_every = 1\neval_limit = 12\n"


@pytest.mark.slow
def test_distill_recipe_runs_and_resumes(tmp_path: Path, tiny_bert: Path, tiny_csv: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, extra=DISTILL)))
    result = run_recipe(recipe, tmp_path / "wd")
    assert [p.name for p in result.stages] == ["distill", "export-teacher", "export", "validate"]
    assert result.report_dir is not None
    report = json.loads((result.report_dir / "report.json").read_text())
    roles = [(v["name"], v["role"]) for v in report["providers"]["cpu"]["variants"]]
    assert roles == [("export-teacher", "reference"), ("export", "final")]
    final = next(v for v in report["providers"]["cpu"]["variants"] if v["role"] == "final")
    teacher = next(v for v in report["providers"]["cpu"]["variants"] if v["role"] == "reference")
    assert final["size_mb"] < teacher["size_mb"]  # one layer of two
    # The distillation's checkpoints lived under resume/ only while it ran.
    assert not (tmp_path / "wd" / "resume").exists()
    again = run_recipe(recipe, tmp_path / "wd")
    assert [p.action for p in again.stages] == ["cached"] * 4
