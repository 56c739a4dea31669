"""``trimformer export``: PyTorch -> ONNX artifact."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import model_argument, overwrite_option


@click.command("export")
@model_argument(help="Trained model folder (Hugging Face or plain) to export.")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option(
    "--task",
    type=click.Choice(["sequence-classification", "feature-extraction"]),
    default=None,
    help="Override the task read from the model's config.",
)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity tolerance per output.")
@overwrite_option
@pass_state
def export_command(
    state: State, model: str, out: str, task: str | None, opset: int, atol: float, overwrite: bool
) -> None:
    """Export MODEL (a trained model folder) to an ONNX artifact, checked against PyTorch.

    \b
    Example:
      trimformer export work/teacher --out work/teacher-onnx
    """
    from trimformer.exporters import export_model

    result = export_model(model, out, task=task, opset=opset, atol=atol, overwrite=overwrite)
    info = result.to_dict()
    emit(
        state,
        info,
        f"exported to {out} (opset {opset}, {info['size_mb']:.1f} MB); parity max abs diff "
        f"{result.parity.worst:.2e} over {', '.join(result.parity.max_abs_diff)}",
    )
