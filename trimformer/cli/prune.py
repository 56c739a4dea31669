"""``trimformer prune``: remove attention heads and feed-forward neurons from an artifact."""

from __future__ import annotations

import click

from trimformer import defaults
from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import data_columns, model_argument, overwrite_option, target_option


@click.command("prune")
@model_argument(help="Artifact folder to prune.")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option("--calibration", default=None, help="Calibration data (.csv, .tsv, .jsonl or builtin:tweets).")
@click.option(
    "--heads", type=float, default=None, help="Fraction of all attention heads to remove, in [0, 1)."
)
@click.option(
    "--ffn", type=float, default=None, help="Fraction of all feed-forward neurons to remove, in [0, 1)."
)
@click.option(
    "--flops", type=float, default=None, help="Fraction of encoder FLOPs to remove (heads and neurons)."
)
@click.option("--params", type=float, default=None, help="Fraction of encoder parameters to remove.")
@click.option(
    "--importance",
    type=click.Choice(["auto", "magnitude", "activation", "fisher", "ablation"]),
    default="auto",
    show_default=True,
    help="How units are scored; auto: fisher with the PyTorch source, else activation with data, else magnitude.",
)
@click.option(
    "--source",
    default=None,
    help="The PyTorch model folder the artifact was exported from (Fisher importance, block reconstruction); "
    "default: the folder its export recorded, if it still holds the same files.",
)
@click.option(
    "--no-reconstruct", is_flag=True, help="Skip the least-squares refit of the kept projection rows."
)
@click.option(
    "--block-steps",
    type=int,
    default=240,
    show_default=True,
    help="With --source: Adam steps per layer of block reconstruction after the ridge refit (0: ridge only).",
)
@click.option(
    "--samples",
    type=int,
    default=defaults.PRUNE_SAMPLES,
    show_default=True,
    help="Calibration examples (Fisher scores, ridge refit, block reconstruction).",
)
@click.option("--min-heads", type=int, default=0, show_default=True, help="Heads every layer keeps.")
@click.option("--min-neurons", type=int, default=0, show_default=True, help="Neurons every layer keeps.")
@data_columns
@target_option
@overwrite_option
@pass_state
def prune_command(
    state: State,
    model: str,
    out: str,
    calibration: str | None,
    heads: float | None,
    ffn: float | None,
    flops: float | None,
    params: float | None,
    importance: str,
    source: str | None,
    no_reconstruct: bool,
    block_steps: int,
    samples: int,
    min_heads: int,
    min_neurons: int,
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
    target: str,
    overwrite: bool,
) -> None:
    """Remove heads and feed-forward neurons from MODEL (an artifact folder), post-training.

    \b
    Example (half the encoder FLOPs, Fisher scores, reconstruction):
      trimformer prune work/teacher-onnx --calibration builtin:tweets --flops 0.5 \\
          --source work/teacher --out work/pruned
    """
    from trimformer.passes.prune.structured import PruneConfig
    from trimformer.pipeline.stages.prune import PruneStageConfig, run_prune

    config = PruneStageConfig(
        model=model,
        out=out,
        prune=PruneConfig(
            heads=heads,
            ffn=ffn,
            flops=flops,
            params=params,
            importance=importance,  # type: ignore[arg-type]
            reconstruct=not no_reconstruct,
            min_heads=min_heads,
            min_neurons=min_neurons,
            block_steps=block_steps,
        ),
        calibration=calibration,
        source=source,
        samples=samples,
        overwrite=overwrite,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        target=target,
    )
    result = run_prune(config)
    lines = [f"{'layer':>5} {'heads':>9} {'neurons':>11} {'MFLOPs':>15}"]
    for row in result["layers"]:
        h, n, f = row["heads"], row["neurons"], row["flops"]
        lines.append(
            f"{row['layer']:>5} {h[0]:>4}->{h[1]:<4} {n[0]:>5}->{n[1]:<5} {f[0] / 1e6:>7.1f}->{f[1] / 1e6:<7.1f}"
        )
    size = result["size_bytes"]
    lines.append(
        f"removed {result['flops_removed']:.1%} of encoder FLOPs and {result['params_removed']:.1%} of encoder "
        f"parameters ({result['importance']} importance); file {size['before'] / 1e6:.1f} -> "
        f"{size['after'] / 1e6:.1f} MB; {result['seconds']:.0f} s"
    )
    if result["reconstruction"]:
        worst = max(r["relative_error_after"] for r in result["reconstruction"])
        lines.append(
            f"reconstruction: worst per-block relative error {worst:.3f} (details in pruning_report.json)"
        )
    lines.append(f"written to {out} (pruning_record.json, pruning_report.json, pruning_map.png)")
    emit(state, result, "\n".join(lines))
