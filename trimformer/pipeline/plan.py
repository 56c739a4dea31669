"""The recipe's stages as a plan, and the adapters that run each one through the library.

A :class:`Stage` names its parameters and its inputs (earlier stages, or outside files hashed by
content); the runner keys its cache on them. An adapter writes only into the folder it is given
and returns deterministic facts for the stage's record (no timings: the record must be the same
bytes on every machine that computes the same thing).

Stages written by other parts of trimformer (distill, package, the pass modules) are imported
when they run, so a recipe that does not use them runs without them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trimformer.errors import GateFailed, UserError
from trimformer.pipeline.recipe import Recipe

__all__ = ["Stage", "StageContext", "build_pass_context", "build_plan", "variant_stages"]

logger = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What an adapter gets: where to write, its inputs' folders, the recipe, a scratch folder."""

    out: Path
    inputs: dict[str, Path]
    recipe: Recipe
    scratch: Path
    # Survives a killed attempt of this very stage (same key): for training checkpoints.
    resume_dir: Path | None = None


@dataclass
class Stage:
    name: str
    kind: str
    params: dict[str, Any]
    run: Callable[[StageContext], dict[str, Any]]
    # role -> name of an earlier stage whose output this stage reads
    inputs: dict[str, str] = field(default_factory=dict)
    # role -> outside path or builtin spec, hashed by content
    external: dict[str, str] = field(default_factory=dict)
    # Whether the stage's output folder is a model artifact (a "variant" in the report).
    artifact: bool = False


# -- data helpers -------------------------------------------------------------------------------
def _columns(recipe: Recipe) -> dict[str, Any]:
    data = recipe.data
    if data is None:
        return {}
    return {
        "text_column": data.text_column,
        "text_pair_column": data.text_pair_column,
        "label_column": data.label_column,
    }


def _data_params(recipe: Recipe) -> dict[str, Any]:
    assert recipe.data is not None
    return recipe.data.model_dump(mode="json", exclude={"source"})


def _accepts(cls: type, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def build_pass_context(artifact: Any, recipe: Recipe, scratch: Path, source: Path | None = None) -> Any:
    """A PassContext from the recipe's data section.

    ``calibration`` makes a fresh streaming reader over the train split each call; ``evaluate``
    scores a candidate graph's accuracy on the eval split through onnxruntime (the eval batches
    are tokenized once); ``data["source"]`` is the PyTorch folder the model was exported from,
    for importance scores that need gradients (computed outside passes/, which never imports torch).
    """
    from trimformer.data import Encoder, load_dataset, map_labels
    from trimformer.data.calibration import DatasetFeeds
    from trimformer.data.tokenizer import load_tokenizer
    from trimformer.passes.base import PassContext

    data = recipe.data
    ctx = PassContext(seed=recipe.seed, scratch=scratch, source=None if source is None else str(source))
    if data is None:
        return ctx
    spec = recipe.resolve(data.source)
    columns = _columns(recipe)
    tok = artifact.meta.tokenizer
    input_names = [io.name for io in artifact.meta.inputs]
    encoder = Encoder(load_tokenizer(artifact.path), input_names, tok.max_length, tok.pad_token_id)
    pad_to = None if data.calibration_pad_to is None else min(data.calibration_pad_to, tok.max_length)
    calib_cache: list[Any] = []

    def calibration() -> Any:
        if not calib_cache:
            calib_cache.append(
                load_dataset(spec, split="train", seed=recipe.seed, limit=data.calibration_samples, **columns)
            )
        return DatasetFeeds(
            calib_cache[0],
            encoder,
            input_names,
            data.calibration_samples,
            data.calibration_batch_size,
            pad_to,
        )

    ctx.calibration = calibration
    if artifact.meta.task != "sequence-classification" or artifact.labels is None:
        return ctx
    eval_set = load_dataset(spec, split=data.eval_split, seed=recipe.seed, limit=data.eval_limit, **columns)
    if eval_set.labels is None:
        return ctx
    from trimformer.pipeline.stages.quantize import onnx_accuracy_fn

    ctx.evaluate = onnx_accuracy_fn(encoder, eval_set, map_labels(eval_set.labels, artifact.labels))
    return ctx


# -- adapters -----------------------------------------------------------------------------------
def _run_train(ctx: StageContext) -> dict[str, Any]:
    from trimformer.training.finetune import TrainConfig, train

    recipe = ctx.recipe
    assert recipe.model.train is not None
    params = {**_columns(recipe), **recipe.model.train.params}
    result = train(
        TrainConfig(
            model=str(ctx.inputs.get("model") or recipe.resolve(recipe.model.source)),
            data=recipe.train_data,
            out=str(ctx.out),
            seed=recipe.seed,
            **params,
        )
    )
    return {
        "best_dev_accuracy": result.best_dev_accuracy,
        "best_step": result.best_step,
        "steps": result.steps,
    }


def _distill_api() -> tuple[type, Callable[[Any], Any]]:
    try:
        module = importlib.import_module("trimformer.training.distill.api")
    except ModuleNotFoundError as exc:
        raise UserError(
            "the distill stage needs trimformer.training.distill.api, which this install lacks"
        ) from exc
    config_cls, fn = getattr(module, "DistillConfig", None), getattr(module, "distill", None)
    if config_cls is None or fn is None:
        raise UserError("trimformer.training.distill.api has no DistillConfig/distill; update trimformer")
    return config_cls, fn


def _run_distill(ctx: StageContext) -> dict[str, Any]:
    recipe = ctx.recipe
    assert recipe.distill is not None and recipe.data is not None
    config_cls, distill = _distill_api()
    kwargs: dict[str, Any] = {
        "teacher": str(ctx.inputs["teacher"]),
        "data": recipe.resolve(recipe.data.source),
        "out": str(ctx.out),
    }
    if _accepts(config_cls, "seed"):
        kwargs["seed"] = recipe.seed
    if _accepts(config_cls, "checkpoint_dir") and ctx.resume_dir is not None:
        # A killed run resumes the distillation from its last checkpoint, not from step 0.
        kwargs["checkpoint_dir"] = str(ctx.resume_dir)
    for key, value in _columns(recipe).items():
        if value is not None and _accepts(config_cls, key):
            kwargs[key] = value
    result = distill(config_cls(**kwargs, **recipe.distill))
    facts = result.to_dict() if hasattr(result, "to_dict") else {}
    return {
        k: v
        for k, v in facts.items()
        if isinstance(v, int | float | str) and k not in ("seconds", "out", "resumed_from")
    }


def _run_export(ctx: StageContext) -> dict[str, Any]:
    from trimformer.exporters import export_model

    recipe = ctx.recipe
    result = export_model(
        ctx.inputs["model"],
        ctx.out,
        task=recipe.model.task,
        opset=recipe.export.opset,
        atol=recipe.export.atol,
    )
    return {"opset": result.artifact.meta.opset, "size_bytes": result.artifact.size_bytes()}


def _pass_runner(index: int) -> Callable[[StageContext], dict[str, Any]]:
    def run(ctx: StageContext) -> dict[str, Any]:
        from trimformer.artifact import ModelArtifact
        from trimformer.passes.base import apply_pass
        from trimformer.pipeline.recipe import known_passes

        spec = ctx.recipe.passes[index]
        config_cls, _ = known_passes()[spec.name]
        config = config_cls.model_validate(spec.params)
        # The passes' own stage glue, when in this tree, writes their records, reports and plots.
        glue = _GLUE.get(spec.name)
        if glue is not None and config_cls.__module__.startswith(f"trimformer.passes.{spec.name}."):
            fn = _glue(*glue[:2])
            if fn is not None:
                return glue[2](fn, config, spec.params, ctx)
        artifact = ModelArtifact.open(ctx.inputs["model"])
        pass_ctx = build_pass_context(artifact, ctx.recipe, ctx.scratch, source=ctx.inputs.get("source"))
        _, report = apply_pass(artifact, spec.name, config, pass_ctx, ctx.out)
        return {"modified": bool(report.modified)}

    return run


def _glue(module: str, name: str) -> Any:
    """A stage's own glue function when that module is in this tree (it adds records and plots)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None


def _run_prune_stage(
    run_prune: Callable[[Any], dict[str, Any]], config: Any, params: dict[str, Any], ctx: StageContext
) -> dict[str, Any]:
    """Through prune_stage: Fisher scores on the torch source, pruning_record.json, the map."""
    from trimformer.pipeline.stages.prune import PruneStageConfig

    recipe = ctx.recipe
    data = recipe.data
    source = ctx.inputs.get("source")
    summary = run_prune(
        PruneStageConfig(
            model=str(ctx.inputs["model"]),
            out=str(ctx.out),
            prune=config,
            calibration=None if data is None else recipe.resolve(data.source),
            source=None if source is None else str(source),
            samples=256 if data is None else data.calibration_samples,
            batch_size=16 if data is None else data.calibration_batch_size,
            **_columns(recipe),
        )
    )
    return {k: summary[k] for k in ("importance", "flops_removed", "params_removed") if k in summary}


def _run_quantize_stage(
    run_quantize: Callable[[Any], dict[str, Any]], config: Any, params: dict[str, Any], ctx: StageContext
) -> dict[str, Any]:
    """Through quantize_stage: calibration from [data], the ranges file and quantization report."""
    from trimformer.pipeline.stages.quantize import QuantizeStageConfig

    recipe = ctx.recipe
    data = recipe.data
    spec = None if data is None else recipe.resolve(data.source)
    if "ranges_from_training" not in params and _training_ranges_fit(ctx.inputs["model"], config):
        # A student distilled with qat = true carries its trained ranges: quantize with those.
        config = config.model_copy(update={"ranges_from_training": True})
    if data is not None and "samples" not in params:
        # [data] calibration_samples is the recipe-wide calibration size.
        config = config.model_copy(update={"samples": data.calibration_samples})
    summary = run_quantize(
        QuantizeStageConfig(
            model=str(ctx.inputs["model"]),
            out=str(ctx.out),
            quantize=config,
            calibration=spec,
            eval=spec if config.max_accuracy_drop is not None else None,
            batch_size=16 if data is None else data.calibration_batch_size,
            pad_to=None if data is None else data.calibration_pad_to,
            eval_limit=None if data is None else data.eval_limit,
            seed=recipe.seed,
            **_columns(recipe),
        )
    )
    return {k: summary[k] for k in ("quantized", "quantizable", "size_mb") if k in summary}


def _training_ranges_fit(model: Path | str, config: Any) -> bool:
    """Whether the quantize stage's input carries QAT ranges that its settings can use."""
    from trimformer.artifact import ModelArtifact
    from trimformer.passes.quantize.training_ranges import (
        carries_training_ranges,
        check_training_options,
        check_training_settings,
    )

    artifact = ModelArtifact.open(model)
    if not carries_training_ranges(artifact.path, [step.step for step in artifact.meta.lineage]):
        return False
    try:
        check_training_options(config)
        check_training_settings(config.resolved(), {}, config.preset)
    except UserError as exc:
        logger.warning("the model carries QAT ranges but the quantize settings differ (%s); calibrating", exc)
        return False
    return True


def _run_fuse_stage(
    run_fuse: Callable[..., dict[str, Any]], config: Any, params: dict[str, Any], ctx: StageContext
) -> dict[str, Any]:
    summary = run_fuse(str(ctx.inputs["model"]), str(ctx.out), config)
    return {k: v for k, v in summary.items() if isinstance(v, int | str) and k not in ("out", "seconds")}


_GLUE: dict[str, tuple[str, str, Callable[..., dict[str, Any]]]] = {
    "prune": ("trimformer.pipeline.stages.prune", "run_prune", _run_prune_stage),
    "quantize": ("trimformer.pipeline.stages.quantize", "run_quantize", _run_quantize_stage),
    "fuse": ("trimformer.pipeline.stages.quantize", "run_fuse", _run_fuse_stage),
}


def _run_validate(ctx: StageContext) -> dict[str, Any]:
    from trimformer.validation.validate import ValidateConfig, parse_grid, validate

    recipe = ctx.recipe
    section = recipe.validate_
    assert section is not None and recipe.data is not None
    final = ctx.inputs["model"]
    reference = ctx.inputs.get("reference")
    same = reference is not None and reference.resolve() == final.resolve()
    common: dict[str, Any] = {
        "data": recipe.resolve(recipe.data.source),
        "threads": section.threads,
        "grid": parse_grid(",".join(section.grid)),
        "split": section.split,
        "limit": section.limit,
        "batch_size": section.batch_size,
        "warmup": section.warmup,
        "runs": section.runs,
        "min_seconds": section.min_seconds,
        "natural_samples": section.natural_samples,
        "seed": recipe.seed,
        **_columns(recipe),
    }
    gates: dict[str, Any] = {}
    for provider in section.providers:
        folder = ctx.out / provider
        config = ValidateConfig(
            model=str(final),
            reference=None if same or reference is None else str(reference),
            provider=provider,
            out=str(folder / "final"),
            max_accuracy_drop=None if same else section.gates.max_accuracy_drop,
            min_speedup=None if same else section.gates.min_speedup,
            **common,
        )
        try:
            report = validate(config)
            gates[provider] = report["gates"]
        except GateFailed:
            # validate wrote its report before raising; the runner decides the exit code later.
            gates[provider] = json.loads((folder / "final" / "report.json").read_text(encoding="utf-8"))[
                "gates"
            ]
        if not section.variants:
            continue
        for role, path in sorted(ctx.inputs.items()):
            if not role.startswith("variant:") or path.resolve() in (
                final.resolve(),
                (reference or final).resolve(),
            ):
                continue
            validate(
                ValidateConfig(
                    model=str(path), provider=provider, out=str(folder / role.split(":", 1)[1]), **common
                )
            )
    return {"gates": gates, "passed": all(g["passed"] for g in gates.values())}


def _run_package(ctx: StageContext) -> dict[str, Any]:
    try:
        from trimformer.packaging.package import package_artifact  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise UserError(
            "the package stage needs trimformer.packaging.package, which this install lacks"
        ) from exc
    recipe = ctx.recipe
    assert recipe.package is not None and recipe.validate_ is not None
    report = ctx.inputs["validate"] / recipe.validate_.providers[0] / "final" / "report.json"
    result = package_artifact(
        ctx.inputs["model"],
        ctx.out / "bundle",
        report=report,
        recipe_text=recipe.text,
        ort_format=recipe.package.ort_format,
        overwrite=False,
    )
    return {"archive": Path(result.archive).name if getattr(result, "archive", None) else None}


# -- the plan -----------------------------------------------------------------------------------
def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


def build_plan(recipe: Recipe) -> list[Stage]:
    """The ordered stages of a recipe (train, distill, export, passes, validate, package)."""
    stages: list[Stage] = []
    taken: set[str] = set()

    def add(stage: Stage) -> Stage:
        stage.name = _unique(stage.name, taken)
        taken.add(stage.name)
        stages.append(stage)
        return stage

    source = recipe.resolve(recipe.model.source)
    data_ext = {"data": recipe.resolve(recipe.data.source)} if recipe.data is not None else {}
    # What the torch model folder of the exported model is: a stage's output or an outside folder.
    torch_model: tuple[str, str] | None = None if recipe.model_is_artifact else ("external", source)

    if recipe.model.train is not None:
        train = add(
            Stage(
                "train",
                "train",
                {"seed": recipe.seed, **_columns(recipe), **recipe.model.train.params},
                _run_train,
                external={"model": source, "train_data": recipe.train_data},
            )
        )
        torch_model = ("stage", train.name)

    def torch_inputs(role: str) -> tuple[dict[str, str], dict[str, str]]:
        assert torch_model is not None
        kind, value = torch_model
        return ({role: value}, {}) if kind == "stage" else ({}, {role: value})

    reference_stage: str | None = None
    if recipe.distill is not None:
        inputs, external = torch_inputs("teacher")
        teacher_model = torch_model
        distill = add(
            Stage(
                "distill",
                "distill",
                {"seed": recipe.seed, **_columns(recipe), **recipe.distill},
                _run_distill,
                inputs=inputs,
                external={**external, **data_ext},
            )
        )
        # The honest baseline for the gates is the teacher as FP32 ONNX, measured in the same run.
        inputs, external = torch_inputs("model")
        ref = add(
            Stage(
                "export-teacher",
                "export",
                {"task": recipe.model.task, **recipe.export.model_dump(mode="json")},
                _run_export,
                inputs=inputs,
                external=external,
                artifact=True,
            )
        )
        reference_stage = ref.name
        torch_model = ("stage", distill.name)
        del teacher_model

    current: tuple[str, str]
    if recipe.model_is_artifact:
        current = ("external", source)
    else:
        inputs, external = torch_inputs("model")
        export = add(
            Stage(
                "export",
                "export",
                {"task": recipe.model.task, **recipe.export.model_dump(mode="json")},
                _run_export,
                inputs=inputs,
                external=external,
                artifact=True,
            )
        )
        current = ("stage", export.name)
        reference_stage = reference_stage or export.name
    reference: tuple[str, str] = ("stage", reference_stage) if reference_stage else current
    variants: list[tuple[str, str]] = [current]

    for index, spec in enumerate(recipe.passes):
        inputs, external = (
            ({"model": current[1]}, {}) if current[0] == "stage" else ({}, {"model": current[1]})
        )
        if torch_model is not None and index == 0:
            # The PyTorch model matches the graph only before the first pass changes it.
            more_in, more_ext = torch_inputs("source")
            inputs, external = {**inputs, **more_in}, {**external, **more_ext}
        params = {"pass": spec.name, "config": spec.params, "seed": recipe.seed}
        if recipe.data is not None:
            params["data"] = _data_params(recipe)
        stage = add(
            Stage(
                spec.name,
                "pass",
                params,
                _pass_runner(index),
                inputs,
                {**external, **data_ext},
                artifact=True,
            )
        )
        current = ("stage", stage.name)
        variants.append(current)

    if recipe.validate_ is not None:
        inputs, external = {}, dict(data_ext)
        for role, (kind, value) in (("model", current), ("reference", reference)):
            (inputs if kind == "stage" else external)[role] = value
        for kind, value in variants:
            role = "variant:" + (value if kind == "stage" else "model")
            (inputs if kind == "stage" else external)[role] = value
        validate = add(
            Stage(
                "validate",
                "validate",
                {"seed": recipe.seed, **_columns(recipe), **recipe.validate_.model_dump(mode="json")},
                _run_validate,
                inputs,
                external,
            )
        )
        if recipe.package is not None:
            inputs = {"validate": validate.name}
            external = {}
            (inputs if current[0] == "stage" else external)["model"] = current[1]
            add(
                Stage(
                    "package",
                    "package",
                    {**recipe.package.model_dump(mode="json"), "recipe_sha256": _sha(recipe.text)},
                    _run_package,
                    inputs,
                    external,
                )
            )
    return stages


def variant_stages(plan: list[Stage]) -> list[Stage]:
    return [stage for stage in plan if stage.artifact]


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
