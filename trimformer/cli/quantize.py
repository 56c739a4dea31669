"""``trimformer quantize``: static (or dynamic) int8 quantization of an artifact, or weight-only
int4/int8 of a causal LM (``--weight-only``)."""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from trimformer import defaults
from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import data_columns, model_argument, overwrite_option, target_option
from trimformer.errors import UserError


@click.command("quantize")
@model_argument(help="Artifact folder to quantize.")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option("--calibration", default=None, help="Calibration data (.csv, .tsv, .jsonl or builtin:tweets).")
@click.option(
    "--preset",
    default="auto",
    show_default=True,
    help="Quantization preset: cpu-vnni, cpu-avx2, arm64, tensorrt (aliases of the targets x86-vnni, "
    "x86-avx2, arm64, tensorrt), or auto (the target's).",
)
@target_option
@click.option(
    "--method", default="minmax", show_default=True, help="Calibration: minmax, entropy, percentile."
)
@click.option("--format", "fmt", default=None, help="qoperator or qdq [default: the preset's].")
@click.option(
    "--samples",
    type=int,
    default=defaults.QUANTIZE_SAMPLES,
    show_default=True,
    help="Calibration rows to use (with --weight-only --algo gptq: 128-token blocks of text, default 128).",
)
@click.option(
    "--batch-size",
    type=int,
    default=defaults.CALIBRATION_BATCH_SIZE,
    show_default=True,
    help="Calibration batch size.",
)
@click.option(
    "--pad-to",
    type=int,
    default=defaults.CALIBRATION_PAD_TO,
    help="Pad calibration batches to this many tokens [default: each batch's longest row].",
)
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales [default: the preset's].")
@click.option(
    "--calibration-cache", default=None, type=click.Path(), help="Reuse ranges saved by an earlier run."
)
@click.option(
    "--ranges-from-training",
    is_flag=True,
    help="Use the activation ranges of QAT (distill --qat) instead of calibrating; no --calibration needed.",
)
@click.option("--exclude", multiple=True, help="Node name to keep in float (repeatable).")
@click.option("--eval", "eval_data", default=None, help="Labelled data for the accuracy-aware mode.")
@click.option(
    "--max-accuracy-drop", type=float, default=None, help="Accuracy points the int8 model may lose."
)
@click.option(
    "--eval-limit", type=int, default=defaults.EVAL_LIMIT, show_default=True, help="Evaluation rows to use."
)
@click.option("--dynamic", is_flag=True, help="onnxruntime dynamic quantization instead (for comparison).")
@click.option("--no-fuse", is_flag=True, help="Do not run the transformer fusions first.")
@click.option(
    "--weight-only",
    default=None,
    metavar="int4|int8",
    help="A causal LM: weight-only MatMulNBits (activations stay float) instead of static int8.",
)
@click.option(
    "--algo", default=None, help="Weight-only algorithm: rtn, gptq (needs --calibration), hqq [rtn]."
)
@click.option("--block-size", type=int, default=None, help="Weight-only: weights per scale, 16-256 [32].")
@click.option(
    "--symmetric/--asymmetric", default=None, help="Weight-only: zero points or not [the algorithm's]."
)
@click.option("--lm-head", default=None, help="Weight-only: the lm_head as int4, int8 or float [int8].")
@click.option(
    "--embedding",
    default=None,
    help="The word table: int8, int4 (GatherBlockQuantized) or auto (int4 where --max-accuracy-drop "
    "holds) [int8]; weight-only: float, int4 or int8 [float].",
)
@click.option(
    "--accuracy-level",
    default=None,
    help="Weight-only: MatMulNBits accuracy_level 0-4, or auto: the fastest meeting --min-token-agreement [auto].",
)
@click.option(
    "--min-token-agreement",
    type=float,
    default=None,
    help="Weight-only: least greedy-token agreement with the float graph [0.95].",
)
@click.option(
    "--prompts",
    default=None,
    help="Weight-only: token-parity prompts from this data's test split [the built-in prompts].",
)
@data_columns
@overwrite_option
@pass_state
def quantize_command(
    state: State,
    model: str,
    out: str,
    calibration: str | None,
    preset: str,
    target: str,
    method: str,
    fmt: str | None,
    samples: int,
    batch_size: int,
    pad_to: int | None,
    per_channel: bool | None,
    calibration_cache: str | None,
    ranges_from_training: bool,
    exclude: tuple[str, ...],
    eval_data: str | None,
    max_accuracy_drop: float | None,
    eval_limit: int,
    dynamic: bool,
    no_fuse: bool,
    weight_only: str | None,
    algo: str | None,
    block_size: int | None,
    symmetric: bool | None,
    lm_head: str | None,
    embedding: str | None,
    accuracy_level: str | None,
    min_token_agreement: float | None,
    prompts: str | None,
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
    overwrite: bool,
) -> None:
    """Quantize MODEL (an artifact folder) to int8, calibrated on --calibration data.

    A student distilled with --qat carries the activation ranges it was trained with; with
    --ranges-from-training they replace calibration (and SmoothQuant is off).

    \b
    Examples:
      trimformer quantize work/teacher-onnx --calibration builtin:tweets --out work/int8
      trimformer quantize work/teacher-onnx --calibration builtin:tweets --out work/int8 \\
          --eval builtin:tweets --max-accuracy-drop 0.5
      trimformer quantize work/qat-student-onnx --ranges-from-training --out work/qat-int8
      trimformer quantize work/lm-onnx --weight-only int4 --out work/lm-int4
      trimformer quantize work/lm-onnx --weight-only int4 --algo gptq --calibration builtin:tweets \\
          --out work/lm-gptq
    """
    weight_only_options = {
        "algo": algo,
        "block_size": block_size,
        "symmetric": symmetric,
        "lm_head": lm_head,
        "accuracy_level": int(accuracy_level)
        if accuracy_level and accuracy_level.isdigit()
        else accuracy_level,
        "min_token_agreement": min_token_agreement,
        "prompts": prompts,
    }
    if weight_only is not None:
        _refuse_int8_options()
        weight_only_options["samples"] = samples if _given("samples") else None
        weight_only_options["embedding"] = embedding
        result = _run_weight_only(
            model, out, weight_only, calibration, target, overwrite, weight_only_options
        )
        emit(state, result, _weight_only_text(result, out))
        return
    given = [name for name, value in weight_only_options.items() if value is not None]
    if given:
        raise UserError(
            f"--{given[0].replace('_', '-')} is a weight-only option; add --weight-only int4|int8"
        )
    from trimformer.passes.quantize.int8 import QuantizeConfig
    from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_quantize

    config = QuantizeConfig(
        preset=preset,
        method=method,
        format=fmt,
        per_channel=per_channel,
        samples=samples,
        exclude=list(exclude),
        fuse=not no_fuse,
        max_accuracy_drop=max_accuracy_drop,
        dynamic=dynamic,
        embedding=embedding or "int8",  # type: ignore[arg-type]  # checked by the config
        calibration_cache=calibration_cache,
        ranges_from_training=ranges_from_training,
    )
    result = run_quantize(
        QuantizeStageConfig(
            model=model,
            out=out,
            quantize=config,
            calibration=calibration,
            eval=eval_data,
            batch_size=batch_size,
            pad_to=pad_to,
            eval_limit=eval_limit,
            overwrite=overwrite,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            target=target,
        )
    )
    emit(state, result, _summary_text(result, out, dynamic, ranges_from_training))


# Options of static int8 that mean nothing to weight-only quantization.
_INT8_ONLY = (
    "preset",
    "method",
    "fmt",
    "batch_size",
    "pad_to",
    "per_channel",
    "calibration_cache",
    "ranges_from_training",
    "exclude",
    "eval_data",
    "max_accuracy_drop",
    "eval_limit",
    "dynamic",
    "no_fuse",
    "text_column",
    "text_pair_column",
    "label_column",
)


def _given(name: str) -> bool:
    return click.get_current_context().get_parameter_source(name) == ParameterSource.COMMANDLINE


def _refuse_int8_options() -> None:
    for name in _INT8_ONLY:
        if _given(name):
            option = next(p for p in click.get_current_context().command.params if p.name == name)
            raise UserError(
                f"{option.opts[0]} is an option of static int8, not of --weight-only; leave it out"
            )


def _run_weight_only(
    model: str,
    out: str,
    bits: str,
    calibration: str | None,
    target: str,
    overwrite: bool,
    options: dict[str, Any],
) -> dict[str, Any]:
    from trimformer.passes.quantize.weight_only import WEIGHT_ONLY_BITS, WeightOnlyConfig
    from trimformer.pipeline.stages.quantize import WeightOnlyStageConfig, run_weight_only

    if bits not in WEIGHT_ONLY_BITS:
        raise UserError(f"--weight-only must be one of {', '.join(WEIGHT_ONLY_BITS)} (got {bits!r})")
    prompts = options.pop("prompts")
    settings = {key: value for key, value in options.items() if value is not None}
    config = WeightOnlyConfig(bits=WEIGHT_ONLY_BITS[bits], **settings)
    return run_weight_only(
        WeightOnlyStageConfig(
            model=model,
            out=out,
            weight_only=config,
            calibration=calibration,
            prompts=prompts,
            target=target,
            overwrite=overwrite,
        )
    )


def _weight_only_text(result: dict[str, Any], out: str) -> str:
    settings = result["settings"]
    human = (
        f"quantized {result['matmul_nbits']} MatMuls to {settings['bits']}-bit MatMulNBits "
        f"({settings['algo']}, block {settings['block_size']}, "
        f"{'symmetric' if settings['symmetric'] else 'asymmetric'}, lm_head {result['lm_head']}, "
        f"embedding {result['embedding']}, accuracy_level {_level_text(result)}, "
        f"target {result['target']}); {result['input_size_mb']:.1f} MB -> {result['size_mb']:.1f} MB; wrote {out}"
    )
    fid = result.get("fidelity")
    if fid:
        human += (
            f"\ntoken agreement with the float graph {fid['token_agreement']:.4f} "
            f"(KL {fid['kl']:.2g}, {fid['tokens']} tokens on {fid['prompts']} prompts)"
        )
    return human


def _level_text(result: dict[str, Any]) -> str:
    levels = result.get("accuracy_levels")
    if not levels:
        return str(result["accuracy_level"])
    measured = ", ".join(
        f"{level}: {f['token_agreement']:.4f} at {f['decode_tokens_per_s']:.0f} tok/s"
        for level, f in levels.items()
        if "token_agreement" in f
    )
    return f"{result['accuracy_level']} (chosen of {measured})"


def _summary_text(result: dict[str, Any], out: str, dynamic: bool, ranges_from_training: bool) -> str:
    """The human-readable result: counts, sizes, what stayed float, the accuracy budget."""
    kept = result["float_nodes"]
    human = (
        f"quantized {result['quantized']} of {result['quantizable']} nodes to int8 "
        f"(target {result['target']}, {result['settings']['preset']}, {result['settings']['format']}"
        f"{', dynamic' if dynamic else ''}{', ranges from training' if ranges_from_training else ''}); "
        f"{result['input_size_mb']:.1f} MB -> {result['size_mb']:.1f} MB; "
        f"output rel. error {result['output_rel_error']}; wrote {out}"
    )
    if kept:
        human += "\nkept in float: " + "; ".join(f"{k['node']} ({k['reason']})" for k in kept)
    aware = result.get("accuracy_aware") or {}
    if "final_drop_points" in aware:
        human += (
            f"\naccuracy drop {aware['final_drop_points']:.2f} points (budget {aware['budget_points']:g})"
        )
    return human
