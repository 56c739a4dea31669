"""``trimformer optimize``: run a list of passes with their default settings."""

from __future__ import annotations

import click

from trimformer import defaults
from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import model_argument, overwrite_option, target_option


@click.command("optimize")
@model_argument(help="Artifact folder to optimize.")
@click.option("--passes", required=True, help="Comma-separated pass names, in order (e.g. fuse,quantize).")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option(
    "--calibration", default=None, help="Dataset for passes that calibrate (.csv/.jsonl/builtin:...)."
)
@click.option(
    "--samples", type=int, default=defaults.PASS_SAMPLES, show_default=True, help="Calibration samples."
)
@target_option
@overwrite_option
@pass_state
def optimize_command(
    state: State,
    model: str,
    passes: str,
    out: str,
    calibration: str | None,
    samples: int,
    target: str,
    overwrite: bool,
) -> None:
    """Run passes on MODEL (an artifact folder) with their defaults; a recipe sets their parameters.

    \b
    Example:
      trimformer optimize work/teacher-onnx --passes fp16 --out work/teacher-fp16
    """
    from trimformer.pipeline.stages.optimize import optimize

    names = [p.strip() for p in passes.split(",") if p.strip()]
    artifact, stats = optimize(
        model, names, out, calibration=calibration, samples=samples, overwrite=overwrite, target=target
    )
    emit(
        state,
        {"artifact": str(artifact.path), "passes": stats, "size_mb": round(artifact.size_bytes() / 1e6, 3)},
        f"ran {', '.join(names)}; wrote {artifact.path} ({artifact.size_bytes() / 1e6:.1f} MB)",
    )
