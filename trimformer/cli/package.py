"""``trimformer package``: artifact (+ validation report) -> bundle folder and .tar.gz."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import model_argument, overwrite_option
from trimformer.errors import UserError


def _generation_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    """``--generation key=value`` pairs; a value is read as JSON (numbers, lists), else as text."""
    from trimformer.runtime.sampling import GenerationSettings

    if not pairs:
        return None
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--generation takes KEY=VALUE (for example temperature=0.7), got {pair!r}")
        try:
            values[key.strip()] = json.loads(raw)
        except ValueError:
            values[key.strip()] = raw
    GenerationSettings.from_dict(values, "--generation")
    return values


def _triton_options(layout: str | None, given: dict[str, Any]) -> Any:
    """``--triton-*`` values as TritonOptions (checked now); refused without ``--layout triton``."""
    from trimformer.packaging.triton import TritonOptions

    values = {key.removeprefix("triton_"): value for key, value in given.items() if value is not None}
    if values and layout is None:
        flags = ", ".join(f"--triton-{key.replace('_', '-')}" for key in values)
        raise UserError(f"{flags} apply to the Triton repository; add --layout triton")
    options = TritonOptions(**values)
    options.check()
    return options


def _kserve_options(layout: str | None, given: dict[str, Any]) -> Any:
    """``--kserve-*`` values as KServeOptions (checked now); refused without ``--layout kserve``."""
    from trimformer.packaging.kserve import KServeOptions

    values = {key.removeprefix("kserve_"): value for key, value in given.items() if value is not None}
    if values and layout != "kserve":
        flags = ", ".join(f"--kserve-{key.replace('_', '-')}" for key in values)
        raise UserError(f"{flags} apply to the KServe InferenceService; add --layout kserve")
    if layout != "kserve":
        return None
    options = KServeOptions(**values)
    options.check()
    return options


def _read_recipe(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe file {path}: {exc}") from exc


@click.command("package")
@model_argument(help="Artifact folder to package.")
@click.option(
    "--out", required=True, type=click.Path(), help="Bundle folder to write; the archive is OUT.tar.gz."
)
@click.option(
    "--report", default=None, help="report.json (or its folder) from `trimformer validate` on MODEL."
)
@click.option("--recipe", default=None, help="Recipe file to record in the manifest.")
@click.option(
    "--name",
    default=None,
    help="The model's name for servers (/v2/models/NAME) [default: the recipe's name, else none: "
    "`serve` then uses the bundle's folder name].",
)
@click.option(
    "--ort", "ort_format", is_flag=True, help="Add an ORT-format copy (model.ort) for minimal builds."
)
@click.option(
    "--generation",
    "generation",
    multiple=True,
    metavar="KEY=VALUE",
    help="A causal LM's default generation setting (max_new_tokens, temperature, top_k, top_p, "
    "repetition_penalty, stop_strings, stop_tokens, seed); repeatable.",
)
@click.option(
    "--layout",
    default=None,
    help="Also write a serving layout into the bundle: triton (a Triton model repository under triton/) "
    "or kserve (that repository and kserve/inferenceservice.yaml).",
)
@click.option(
    "--kserve-storage-uri",
    default=None,
    help="KServe: where the bundle's triton/ folder will be uploaded (s3://, gs://, pvc://, https://...).",
)
@click.option("--kserve-cpu", default=None, help="KServe: the predictor's CPU (requests = limits) [2].")
@click.option(
    "--kserve-memory", default=None, help="KServe: the predictor's memory (requests = limits) [2Gi]."
)
@click.option("--triton-max-batch-size", type=int, default=None, help="Triton: max_batch_size [32].")
@click.option(
    "--triton-max-queue-delay-ms",
    type=float,
    default=None,
    help="Triton: dynamic batching's queue delay [1].",
)
@click.option("--triton-kind", default=None, help="Triton: instances on cpu or gpu [cpu].")
@click.option("--triton-instances", type=int, default=None, help="Triton: instances of each entry [1].")
@click.option(
    "--triton-threads", type=int, default=None, help="Triton: onnxruntime intra-op threads [0: its default]."
)
@overwrite_option
@pass_state
def package_command(
    state: State,
    model: str,
    out: str,
    report: str | None,
    recipe: str | None,
    name: str | None,
    ort_format: bool,
    generation: tuple[str, ...],
    layout: str | None,
    overwrite: bool,
    **layout_options: Any,
) -> None:
    """Package MODEL (an artifact folder) into a self-verifying bundle folder and OUT.tar.gz.

    \b
    Example:
      trimformer package work/student-int8 --out dist/sentiment \\
          --report work/student-int8/report/report.json --ort
      trimformer verify dist/sentiment.tar.gz
    """
    from trimformer.packaging.package import package_artifact

    generation_settings = _generation_options(generation)
    # The --triton-* and --kserve-* options (click passes them by their names).
    triton_values = {k: v for k, v in layout_options.items() if k.startswith("triton_")}
    kserve_values = {k: v for k, v in layout_options.items() if k.startswith("kserve_")}
    triton_options = _triton_options(layout, triton_values)
    kserve_options = _kserve_options(layout, kserve_values)
    result = package_artifact(
        model,
        out,
        report=report,
        recipe_text=_read_recipe(recipe),
        ort_format=ort_format,
        overwrite=overwrite,
        generation=generation_settings,
        name=name,
        layout=layout,
        triton=triton_options,
        kserve=kserve_options,
    )
    info = result.to_dict()
    note = "" if info["validated"] else " (no --report: the manifest carries no metrics)"
    emit(
        state,
        info,
        f"packaged {model} into {info['folder']} and {info['archive']} ({len(info['files'])} files, "
        f"{info['size_mb']:.1f} MB){note}\ndigest {info['digest']}",
    )
