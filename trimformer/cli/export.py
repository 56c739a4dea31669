"""``trimformer export``: PyTorch -> ONNX artifact."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import model_argument, overwrite_option
from trimformer.formats.tasks import TASK_NAMES


@click.command("export")
@model_argument(help="Trained model folder (Hugging Face or plain) to export.")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option(
    "--task",
    type=click.Choice(TASK_NAMES),
    default=None,
    help="Override the task read from the model's config.",
)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option(
    "--atol",
    type=float,
    default=None,
    help="Parity tolerance per output [default: 1e-4; 1e-3 on a causal LM's logits].",
)
@click.option(
    "--prompts",
    default=None,
    help="Causal LMs: parity prompts from a dataset's test split (each text's first half) "
    "[default: 24 built-in prompts].",
)
@click.option(
    "--parity-tokens",
    type=int,
    default=32,
    show_default=True,
    help="Causal LMs: greedy tokens per prompt that must equal PyTorch's.",
)
@overwrite_option
@pass_state
def export_command(
    state: State,
    model: str,
    out: str,
    task: str | None,
    opset: int,
    atol: float | None,
    prompts: str | None,
    parity_tokens: int,
    overwrite: bool,
) -> None:
    """Export MODEL (a trained model folder) to an ONNX artifact, checked against PyTorch; a causal
    LM gets one graph with a KV cache, proved by prompt logits and greedy tokens.

    \b
    Example:
      trimformer export work/teacher --out work/teacher-onnx
    """
    from trimformer.exporters import export_model

    result = export_model(
        model,
        out,
        task=task,
        opset=opset,
        atol=atol,
        overwrite=overwrite,
        prompts=prompts,
        parity_tokens=parity_tokens,
    )
    info = result.to_dict()
    greedy = info.get("greedy_parity")
    tokens = (
        f"; greedy tokens equal PyTorch's on {greedy['prompts']} prompts x {greedy['new_tokens']} tokens"
        if greedy
        else ""
    )
    emit(
        state,
        info,
        f"exported to {out} (opset {opset}, {info['size_mb']:.1f} MB); parity max abs diff "
        f"{result.parity.worst:.2e} over {', '.join(result.parity.max_abs_diff)}{tokens}",
    )
