"""The run report: every variant in report.json/.md/.html, plots embedded, the pruning map."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.pipeline.runner_support import TEST_PASS, register_stamp, tiny_recipe_text, write_recipe
from trimformer.formats.pruning_record import kept_per_layer, load_pruning_record
from trimformer.pipeline.recipe import known_passes, load_recipe
from trimformer.pipeline.report import pareto_front
from trimformer.pipeline.runner import run_recipe


def test_pareto_front() -> None:
    # (latency, accuracy): b is slower and worse than a; c is slower but better; d ties a.
    points = [(1.0, 0.80), (2.0, 0.70), (3.0, 0.90), (1.0, 0.80)]
    assert pareto_front(points) == [True, False, True, True]
    assert pareto_front([]) == []


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                (self.images if tag == "img" else self.refs).append(value)
        if tag in ("script", "link", "iframe"):
            self.refs.append(tag)


def test_report_of_a_run(
    tmp_path: Path, tiny_bert: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real prune pass, then the test pass that zeroes one initializer (a worse final model).
    known_passes()
    register_stamp(monkeypatch)
    passes = [{"name": "prune", "heads": 0.25, "ffn": 0.3, "min_heads": 1}, {"name": TEST_PASS, "scale": 0.0}]
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe_text(tiny_bert, tiny_csv, passes=passes)))
    result = run_recipe(recipe, tmp_path / "wd")
    folder = result.report_dir
    assert folder is not None

    report = json.loads((folder / "report.json").read_text())
    variants = report["providers"]["cpu"]["variants"]
    assert [(v["name"], v["role"]) for v in variants] == [
        ("export", "reference"),
        ("prune", "intermediate"),
        (TEST_PASS, "final"),
    ]
    for v in variants:
        assert 0.0 <= v["accuracy"] <= 1.0 and v["latency_ms"]["1x16"]["p50"] > 0 and v["size_mb"] > 0
    assert any(v["pareto"] for v in variants)
    layers = kept_per_layer(load_pruning_record(next(p.out for p in result.stages if p.name == "prune")))
    assert report["pruning"] == [{"stage": "prune", "layers": layers}]
    assert report["gates_passed"] is True
    assert [s["name"] for s in report["stages"]] == ["export", "prune", TEST_PASS, "validate"]

    plots = sorted(p.name for p in folder.glob("*.png"))
    assert plots == ["latency-cpu.png", "pareto-cpu.png", "pruning-prune.png", "size.png"]
    size = report["size"]
    assert size["model"] == TEST_PASS and size["limit_mb"] is None
    assert size["embeddings_mb"] + size["encoder_mb"] == pytest.approx(size["model_files_mb"], abs=2e-3)

    markdown = (folder / "report.md").read_text()
    assert "| export | reference |" in markdown and f"| {TEST_PASS} | final |" in markdown
    assert f"## Size ({TEST_PASS})" in markdown and "| embedding tables |" in markdown
    for row in layers:
        cells = f"| {row['layer']} | {row['heads_kept']}/4 | {row['ffn_kept']}/64 |"
        assert cells in markdown

    page = (folder / "report.html").read_text()
    parser = _Collect()
    parser.feed(page)
    # Opens offline: no script, stylesheet link or external reference; every plot is inline.
    assert parser.refs == []
    assert len(parser.images) == 4
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?://", page)
