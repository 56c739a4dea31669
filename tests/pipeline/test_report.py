"""The run report: every variant in report.json/.md/.html, plots embedded, the pruning map."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.pipeline.runner_support import TEST_PASS, register_stamp, tiny_recipe_text, write_recipe
from trimformer.pipeline.recipe import known_passes, load_recipe
from trimformer.pipeline.report import pareto_front, pruning_layers
from trimformer.pipeline.runner import run_recipe

LAYERS = [
    {"layer": 0, "num_heads": 4, "ffn_size": 64, "kept_heads": [0, 2, 3], "kept_neurons": list(range(40))},
    {"layer": 1, "num_heads": 4, "ffn_size": 64, "kept_heads": [1], "kept_neurons": list(range(64))},
]


def test_pareto_front() -> None:
    # (latency, accuracy): b is slower and worse than a; c is slower but better; d ties a.
    points = [(1.0, 0.80), (2.0, 0.70), (3.0, 0.90), (1.0, 0.80)]
    assert pareto_front(points) == [True, False, True, True]
    assert pareto_front([]) == []


@pytest.mark.parametrize(
    "record",
    [
        {"layers": LAYERS},
        {"record": {"layers": LAYERS}},
        {
            "per_layer": [
                {"layer": 0, "heads_before": 4, "heads_after": 3, "ffn_before": 64, "ffn_after": 40},
                {"layer": 1, "heads_total": 4, "heads_removed": 3, "ffn_total": 64, "ffn_removed": []},
            ]
        },
    ],
)
def test_pruning_layers_reads_the_spellings(record: dict[str, object]) -> None:
    assert pruning_layers(record) == [
        {"layer": 0, "heads_kept": 3, "heads_total": 4, "ffn_kept": 40, "ffn_total": 64},
        {"layer": 1, "heads_kept": 1, "heads_total": 4, "ffn_kept": 64, "ffn_total": 64},
    ]


def test_pruning_layers_without_per_layer_data() -> None:
    assert pruning_layers({"flops_removed": 0.3}) == []


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
    # The test pass registered as "prune" reports the per-layer record a prune stage writes
    # (after the real passes registered themselves, so that it replaces the real one here).
    known_passes()
    register_stamp(monkeypatch, "prune")
    register_stamp(monkeypatch)
    passes = [{"name": "prune", "tag": "p", "layers": LAYERS}, {"name": TEST_PASS, "tag": "q", "scale": 0.0}]
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
    assert report["pruning"] == [{"stage": "prune", "layers": pruning_layers({"layers": LAYERS})}]
    assert report["gates_passed"] is True
    assert [s["name"] for s in report["stages"]] == ["export", "prune", TEST_PASS, "validate"]

    plots = sorted(p.name for p in folder.glob("*.png"))
    assert plots == ["latency-cpu.png", "pareto-cpu.png", "pruning-prune.png"]

    markdown = (folder / "report.md").read_text()
    assert "| export | reference |" in markdown and f"| {TEST_PASS} | final |" in markdown
    assert "| 0 | 3/4 | 40/64 |" in markdown and "| 1 | 1/4 | 64/64 |" in markdown

    page = (folder / "report.html").read_text()
    parser = _Collect()
    parser.feed(page)
    # Opens offline: no script, stylesheet link or external reference; every plot is inline.
    assert parser.refs == []
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?://", page)
