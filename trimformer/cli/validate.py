"""``trimformer validate``: accuracy, fidelity, latency and gates."""

from __future__ import annotations

import json

import click

from ..errors import GateFailed
from .main import State, pass_state
from .options import data_columns


@click.command("validate")
@click.argument("model")
@click.option("--data", required=True, help="Dataset to evaluate on (.csv, .tsv, .jsonl or builtin:tweets).")
@click.option("--reference", default=None, help="Artifact or PyTorch model folder to compare against.")
@click.option("--provider", default="cpu", show_default=True, help="cpu, cuda, tensorrt, openvino, coreml or dml.")
@click.option("--threads", type=int, default=None, help="Threads for inference [default: all cores].")
@click.option("--grid", default="1x128,32x128", show_default=True, help="Latency shapes, BATCHxSEQ,...")
@click.option("--split", default="auto", show_default=True, help="all, train, dev, test (auto: test for built-ins).")
@click.option("--limit", type=int, default=None, help="Use at most N examples.")
@click.option("--runs", type=int, default=30, show_default=True, help="Minimum timed runs per shape.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs per shape first.")
@click.option("--max-accuracy-drop", type=float, default=None, help="Gate: points of accuracy lost vs reference.")
@click.option("--min-speedup", type=float, default=None, help="Gate: p50 speed-up over the reference, every shape.")
@click.option("--out", default=None, type=click.Path(), help="Report folder [default: MODEL/report].")
@data_columns
@pass_state
def validate_command(state: State, model: str, grid: str, **kwargs: object) -> None:
    """Validate MODEL (an artifact folder) with onnxruntime; exit 1 when a gate fails.

    \b
    Example:
      trimformer validate work/teacher-onnx --data builtin:tweets --reference work/teacher \\
          --max-accuracy-drop 1.0
    """
    from ..pipeline.validate import ValidateConfig, parse_grid, validate

    config = ValidateConfig(model=model, grid=parse_grid(grid), **kwargs)  # type: ignore[arg-type]
    try:
        report = validate(config)
    except GateFailed:
        report_path = config.out or f"{model}/report"
        _print(state, report_path)
        raise
    _print(state, report["report_dir"])


def _print(state: State, report_dir: str) -> None:
    from pathlib import Path

    if state.json:
        click.echo((Path(report_dir) / "report.json").read_text(encoding="utf-8"))
    else:
        click.echo((Path(report_dir) / "report.md").read_text(encoding="utf-8"))
        click.echo(f"report written to {report_dir}/report.json")
