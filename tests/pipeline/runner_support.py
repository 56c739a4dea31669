"""Helpers shared by the recipe, runner, report and interrupt tests (no tests here).

``stamp`` is a tiny registered pass for tests: it changes the model deterministically (a graph
doc string and one scaled initializer), can report per-layer pruning stats, and can sleep, so
that a killed run has a moment to be killed in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass
from pydantic import Field

from trimformer.passes.base import PASS_REGISTRY, PassConfig, PassContext, PassEntry, PassReport

TEST_PASS = "stamp"


class StampConfig(PassConfig):
    tag: str = "stamped"
    scale: float = 1.0
    sleep: float = 0.0
    layers: list[dict[str, Any]] = Field(default_factory=list)


class StampPass(InPlacePass):
    def __init__(self, config: StampConfig, ctx: PassContext) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    def call(self, model: ir.Model) -> PassReport:
        if self.config.sleep:
            time.sleep(self.config.sleep)
        model.graph.doc_string = self.config.tag
        changed = 0
        for value in model.graph.initializers.values():
            array = value.const_value.numpy() if value.const_value is not None else None
            if array is not None and array.dtype == np.float32 and array.ndim == 1 and changed == 0:
                value.const_value = ir.tensor(array * np.float32(self.config.scale), name=value.name)
                changed += 1
        accuracy = self.ctx.evaluate(ir.to_proto(model)) if self.ctx.evaluate is not None else None
        feeds = self.ctx.calibration().get_next() if self.ctx.calibration is not None else None
        stats = {
            "changed": changed,
            "accuracy": accuracy,
            "calibration_batch": None if feeds is None else sorted(feeds),
            "source": Path(self.ctx.source).name if self.ctx.source else None,
        }
        if self.config.layers:
            stats["layers"] = self.config.layers
        return PassReport(model, True, stats)


def stamp_factory(config: StampConfig, ctx: PassContext) -> StampPass:
    return StampPass(config, ctx)


def register_stamp(monkeypatch: Any = None, name: str = TEST_PASS) -> None:
    """Register the test pass (under ``name``); with monkeypatch the registry is restored after."""
    entry = PassEntry(name, StampConfig, stamp_factory)
    if monkeypatch is not None:
        monkeypatch.setitem(PASS_REGISTRY, name, entry)
    else:
        PASS_REGISTRY[name] = entry


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def tiny_recipe_text(
    model: Path | str,
    data: Path | str,
    passes: list[dict[str, Any]] | None = None,
    gates: dict[str, Any] | None = None,
    package: bool = False,
    validate: bool = True,
    extra: str = "",
) -> str:
    lines = [
        'name = "tiny"',
        "seed = 0",
        "[model]",
        f"source = {toml_value(str(model))}",
        "[data]",
        f"source = {toml_value(str(data))}",
        "calibration_samples = 8",
        "calibration_pad_to = 16",
        "eval_limit = 24",
        "[export]",
        "opset = 17",
    ]
    for spec in passes or []:
        lines.append("[[passes]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in spec.items()]
    if validate:
        lines += [
            "[validate]",
            'grid = ["1x16", "2x16"]',
            "limit = 24",
            "runs = 2",
            "warmup = 1",
            "min_seconds = 0.0",
            "natural_samples = 3",
            "batch_size = 8",
        ]
        if gates:
            lines.append("[validate.gates]")
            lines += [f"{k} = {toml_value(v)}" for k, v in gates.items()]
    if package:
        lines.append("[package]")
    return "\n".join(lines) + "\n" + extra


def write_recipe(folder: Path, text: str, name: str = "tiny.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def stage_folders(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "stages").iterdir() if not p.name.startswith("."))


def stable_json(path: Path, replace: dict[str, str] | None = None) -> Any:
    """A JSON file without the fields that are measured or timed (and so differ run to run),
    with the strings in ``replace`` (such as a workdir's path) replaced."""
    measured = {
        "seconds",
        "latency_ms",
        "throughput_per_s",
        "natural_latency_ms",
        "peak_memory_mb",
        "report_sha256",
        "speedup",
    }

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in measured}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    text = path.read_text(encoding="utf-8")
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    return clean(json.loads(text))


def test_durations_are_stripped_only_from_trimformer_records(tmp_path: Path) -> None:
    from trimformer.pipeline.runner import _strip_durations

    vocab = '{"model": {"vocab": {"seconds": 3823, "minutes": 3824}}}\n'
    (tmp_path / "tokenizer.json").write_text(vocab)
    (tmp_path / "trimformer_train.json").write_text('{"result": {"seconds": 12.5, "steps": 3}}\n')
    moved = _strip_durations(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == vocab
    assert moved == {"trimformer_train.json.result.seconds": 12.5}
    assert '"seconds": null' in (tmp_path / "trimformer_train.json").read_text()
