"""``trimformer validate``: accuracy, fidelity, latency and gates."""

from __future__ import annotations

import click

from trimformer.cli.main import State, pass_state
from trimformer.cli.options import data_columns, model_argument
from trimformer.errors import GateFailed


@click.command("validate")
@model_argument(help="Artifact folder to validate.")
@click.option("--data", required=True, help="Dataset to evaluate on (.csv, .tsv, .jsonl or builtin:tweets).")
@click.option("--reference", default=None, help="Artifact or PyTorch model folder to compare against.")
@click.option(
    "--provider", default="cpu", show_default=True, help="cpu, cuda, tensorrt, openvino, coreml or dml."
)
@click.option("--providers", default=None, help="Several providers, comma-separated (e.g. cuda,tensorrt).")
@click.option("--device-id", type=int, default=0, show_default=True, help="GPU for cuda/tensorrt.")
@click.option("--trt-cache", default=None, type=click.Path(), help="TensorRT engine cache folder.")
@click.option("--trt-fp16", is_flag=True, help="Let TensorRT build fp16 engines.")
@click.option("--trt-int8", is_flag=True, help="Let TensorRT build int8 engines (for QDQ models).")
@click.option("--threads", type=int, default=None, help="Threads for inference [default: all cores].")
@click.option("--grid", default="1x128,32x128", show_default=True, help="Latency shapes, BATCHxSEQ,...")
@click.option(
    "--split", default="auto", show_default=True, help="all, train, dev, test (auto: test for built-ins)."
)
@click.option("--limit", type=int, default=None, help="Use at most N examples.")
@click.option("--runs", type=int, default=30, show_default=True, help="Minimum timed runs per shape.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs per shape first.")
@click.option(
    "--max-accuracy-drop", type=float, default=None, help="Gate: points of accuracy lost vs reference."
)
@click.option(
    "--min-speedup", type=float, default=None, help="Gate: p50 speed-up over the reference, every shape."
)
@click.option(
    "--max-size-mb", type=float, default=None, help="Gate: the model files' size in MB (no reference needed)."
)
@click.option(
    "--perplexity-context",
    type=int,
    default=None,
    help="Causal LMs: perplexity window [default: min(512, context)].",
)
@click.option(
    "--perplexity-tokens", type=int, default=16384, show_default=True, help="Causal LMs: test tokens scored."
)
@click.option(
    "--prompts", type=int, default=20, show_default=True, help="Causal LMs: prompts for token agreement."
)
@click.option(
    "--new-tokens", type=int, default=32, show_default=True, help="Causal LMs: greedy tokens per prompt."
)
@click.option(
    "--max-perplexity-increase",
    type=float,
    default=None,
    help="Gate (causal LMs): percent of perplexity gained.",
)
@click.option(
    "--min-token-agreement",
    type=float,
    default=None,
    help="Gate (causal LMs): share of greedy tokens agreeing.",
)
@click.option(
    "--min-decode-speedup",
    type=float,
    default=None,
    help="Gate (causal LMs): decode tokens/s over the reference's.",
)
@click.option("--out", default=None, type=click.Path(), help="Report folder [default: MODEL/report].")
@data_columns
@pass_state
def validate_command(
    state: State,
    model: str,
    grid: str,
    providers: str | None,
    device_id: int,
    trt_cache: str | None,
    trt_fp16: bool,
    trt_int8: bool,
    perplexity_context: int | None,
    perplexity_tokens: int,
    prompts: int,
    new_tokens: int,
    max_perplexity_increase: float | None,
    min_token_agreement: float | None,
    min_decode_speedup: float | None,
    **kwargs: object,
) -> None:
    """Validate MODEL (an artifact folder) with onnxruntime; exit 1 when a gate fails. A causal LM
    is measured by perplexity, greedy-token agreement and KL against --reference, prompt latency
    and decode tokens/s (docs/DECODERS.md).

    \b
    Example:
      trimformer validate work/teacher-onnx --data builtin:tweets --reference work/teacher \\
          --max-accuracy-drop 1.0
      trimformer validate work/lm-onnx --data builtin:tweets --reference work/lm --min-token-agreement 0.99
    """
    from trimformer.pipeline.stages.validate import run_validate
    from trimformer.validation.decoder import DecoderValidateConfig
    from trimformer.validation.runners import ProviderOptions
    from trimformer.validation.validate import ValidateConfig, parse_grid

    decoder = DecoderValidateConfig(
        perplexity_context=perplexity_context,
        perplexity_tokens=perplexity_tokens,
        prompts=prompts,
        new_tokens=new_tokens,
        max_perplexity_increase=max_perplexity_increase,
        min_token_agreement=min_token_agreement,
        min_decode_speedup=min_decode_speedup,
    )
    config = ValidateConfig(
        model=model,
        decoder=decoder,
        grid=parse_grid(grid),
        providers=tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else (),
        provider_options=ProviderOptions(device_id, trt_cache, trt_fp16, trt_int8),
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        report = run_validate(config)
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
