"""``trimformer fuse``: attention / LayerNorm / GELU / embedding fusions of an artifact."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import model_argument, overwrite_option, target_option


@click.command("fuse")
@model_argument(help="Artifact folder to fuse.")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option(
    "--num-heads", type=int, default=0, help="Attention heads [default: from config.json or the graph]."
)
@click.option(
    "--hidden-size", type=int, default=0, help="Hidden size [default: from config.json or the graph]."
)
@click.option(
    "--cpu-kernels/--no-cpu-kernels",
    default=True,
    show_default=True,
    help="Rewrite to onnxruntime's faster CPU kernels (split SkipLayerNorm, bounded attention mask); "
    "turn off for GPU execution providers (the webgpu and tensorrt targets turn it off).",
)
@target_option
@overwrite_option
@pass_state
def fuse_command(
    state: State,
    model: str,
    out: str,
    num_heads: int,
    hidden_size: int,
    cpu_kernels: bool,
    target: str,
    overwrite: bool,
) -> None:
    """Fuse MODEL's transformer blocks with onnxruntime's optimizer (checked against the input).

    \b
    A causal LM gets the decoder fusions instead (GroupQueryAttention, SimplifiedLayerNormalization,
    SkipSimplifiedLayerNormalization), written only when greedy tokens are unchanged.

    \b
    Examples:
      trimformer fuse work/teacher-onnx --out work/teacher-fused
      trimformer fuse work/lm-onnx --out work/lm-fused
    """
    from trimformer.passes.fuse.fusion import FuseConfig
    from trimformer.pipeline.stages.quantize import run_fuse

    result = run_fuse(
        model,
        out,
        FuseConfig(num_heads=num_heads, hidden_size=hidden_size, cpu_kernels=cpu_kernels),
        overwrite=overwrite,
        target=target,
    )
    counts = ", ".join(f"{op} x{n}" for op, n in result["fusions"].items() if n) or "nothing fused"
    if result.get("task") == "causal-lm":
        parity = result["parity"]
        text = (
            f"fused for {result['target']}: {counts}; greedy tokens equal the exported graph's "
            f"({parity['tokens']} tokens on {parity['prompts']} prompts); wrote {out}"
        )
        emit(state, result, text)
        return
    emit(
        state,
        result,
        f"fused for {result['target']}: {counts} (max abs diff {result['max_abs_diff']:.2e}); wrote {out}",
    )
