"""The recipe's stages as a plan, and the adapters that run each one through the library.

A :class:`Stage` names its parameters and its inputs (earlier stages, or outside files hashed by
content); the runner keys its cache on them. An adapter writes only into the folder it is given
and returns a :class:`StageResult` of deterministic facts for the stage's record (no timings: the
record must be the same bytes on every machine that computes the same thing).

The torch side (train, distill) is imported when its stage runs, so that a recipe of ONNX passes
starts without loading PyTorch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trimformer.artifact import ModelArtifact
from trimformer.errors import GateFailed, UserError
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.fsutil import sha256_bytes
from trimformer.packaging.package import package_artifact
from trimformer.passes.base import PassConfig, apply_pass
from trimformer.passes.fuse.decoder import DecoderFuseConfig
from trimformer.passes.fuse.fusion import FuseConfig
from trimformer.passes.prune.structured import PruneConfig
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.passes.quantize.presets import AUTO_PRESET
from trimformer.passes.quantize.training_ranges import (
    carries_training_ranges,
    check_training_options,
    check_training_settings,
)
from trimformer.passes.quantize.weight_only import WeightOnlyConfig
from trimformer.passes.trim_vocab import TrimVocabConfig
from trimformer.pipeline.context import Columns, DataRequest, build_pass_context, host_target
from trimformer.pipeline.recipe import (
    PassSpec,
    Recipe,
    known_passes,
    kserve_options,
    pass_config,
    stage_params,
    triton_options,
)
from trimformer.pipeline.stages.params import (
    EvaluatingStageParams,
    PassStageParams,
    PruneStageParams,
    QuantizeStageParams,
)
from trimformer.pipeline.stages.prune import PruneStageConfig, run_prune
from trimformer.pipeline.stages.quantize import (
    QuantizeStageConfig,
    WeightOnlyStageConfig,
    run_fuse,
    run_fuse_decoder,
    run_quantize,
    run_weight_only,
)
from trimformer.pipeline.stages.result import StageResult
from trimformer.pipeline.stages.trim_vocab import run_trim_vocab
from trimformer.runtime.cpu import cpu_class

__all__ = ["Stage", "StageContext", "StageResult", "build_plan", "variant_stages"]

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
    run: Callable[[StageContext], StageResult]
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


def _data_request(recipe: Recipe, params: EvaluatingStageParams, samples: int) -> DataRequest:
    """A recipe pass's data: calibration and (offered) evaluation on the recipe's [data]."""
    data = recipe.data
    spec = None if data is None else recipe.resolve(data.source)
    return DataRequest(
        calibration=spec,
        evaluate=spec,
        samples=samples,
        batch_size=params.batch_size,
        pad_to=params.pad_to,
        eval_split=params.eval_split,
        eval_limit=params.eval_limit,
        columns=Columns(**_columns(recipe)),
        seed=recipe.seed,
        evaluate_optional=True,
    )


# -- adapters -----------------------------------------------------------------------------------
def _run_train(ctx: StageContext) -> StageResult:
    from trimformer.training.finetune import TrainConfig, train

    recipe = ctx.recipe
    assert recipe.model.train is not None
    params = {**_columns(recipe), **recipe.model.train.params}
    result = train(
        TrainConfig(
            model=str(ctx.inputs.get("model") or recipe.source),
            data=recipe.train_data,
            out=str(ctx.out),
            seed=recipe.seed,
            **params,
        )
    )
    return StageResult(
        {"best_dev_accuracy": result.best_dev_accuracy, "best_step": result.best_step, "steps": result.steps}
    )


def _run_train_lm(ctx: StageContext) -> StageResult:
    """A causal LM trained (from scratch, or on from model.source); a killed run resumes."""
    from trimformer.training.lm import LMConfig, LMShape, train_causal_lm

    recipe = ctx.recipe
    assert recipe.model.train is not None
    params: dict[str, Any] = {"text_column": _columns(recipe).get("text_column"), **recipe.model.train.params}
    shape = LMShape(**params.pop("shape", {}))
    if ctx.resume_dir is not None:
        params["checkpoint_dir"] = str(ctx.resume_dir)
    source = ctx.inputs.get("model")
    result = train_causal_lm(
        LMConfig(
            model=None if source is None else str(source),
            data=recipe.train_data,
            out=str(ctx.out),
            seed=recipe.seed,
            shape=shape,
            **params,
        )
    )
    return StageResult(
        {
            "dev_perplexity": result.dev_perplexity,
            "unigram_dev_perplexity": result.unigram_dev_perplexity,
            "best_step": result.best_step,
            "steps": result.steps,
        }
    )


def _run_distill(ctx: StageContext) -> StageResult:
    from trimformer.training.distill.api import DistillConfig, distill

    recipe = ctx.recipe
    assert recipe.distill is not None and recipe.data is not None
    columns: dict[str, Any] = {k: v for k, v in _columns(recipe).items() if v is not None}
    # A killed run resumes the distillation from its last checkpoint, not from step 0.
    resume: dict[str, Any] = {} if ctx.resume_dir is None else {"checkpoint_dir": str(ctx.resume_dir)}
    result = distill(
        DistillConfig(
            teacher=str(ctx.inputs["teacher"]),
            data=recipe.resolve(recipe.data.source),
            out=str(ctx.out),
            seed=recipe.seed,
            **resume,
            **columns,
            **recipe.distill,
        )
    )
    measured = ("seconds", "out", "resumed_from")
    return StageResult(
        {k: v for k, v in result.to_dict().items() if isinstance(v, int | float | str) and k not in measured}
    )


def _run_export(ctx: StageContext) -> StageResult:
    from trimformer.exporters import export_model

    recipe = ctx.recipe
    section = recipe.export
    decoder: dict[str, Any] = {}
    if recipe.is_causal_lm:
        prompts = section.prompts or (recipe.data.source if recipe.data is not None else None)
        decoder = {"prompts": None if prompts is None else recipe.resolve(prompts)}
        if section.parity_tokens is not None:
            decoder["parity_tokens"] = section.parity_tokens
    result = export_model(
        ctx.inputs["model"],
        ctx.out,
        task=recipe.model.task,
        opset=section.opset,
        atol=section.atol,
        **decoder,
    )
    return StageResult({"opset": result.artifact.meta.opset, "size_bytes": result.artifact.size_bytes()})


def _pass_runner(index: int) -> Callable[[StageContext], StageResult]:
    def run(ctx: StageContext) -> StageResult:
        spec = ctx.recipe.passes[index]
        config_cls = known_passes()[spec.name].config_cls
        config = pass_config(config_cls, spec, ctx.recipe.data)
        # The real prune/quantize/fuse passes go through their stage functions (records, reports,
        # plots); a pass registered under the same name with another config (a test's stand-in)
        # runs as any other pass.
        adapter = _STAGE_ADAPTERS.get(config_cls, _run_any_pass)
        return adapter(config, spec, ctx)

    return run


def _run_any_pass(config: PassConfig, spec: PassSpec, ctx: StageContext) -> StageResult:
    stage = stage_params(ctx.recipe.data, "")
    assert isinstance(stage, PassStageParams)
    artifact = ModelArtifact.open(ctx.inputs["model"])
    request = _data_request(ctx.recipe, stage, stage.samples)
    pass_ctx = build_pass_context(
        artifact, request, ctx.scratch, source=ctx.inputs.get("source"), target=host_target(ctx.recipe.target)
    )
    _, report = apply_pass(artifact, spec.name, config, pass_ctx, ctx.out)
    return StageResult({"modified": bool(report.modified)})


def _run_prune_stage(config: Any, spec: PassSpec, ctx: StageContext) -> StageResult:
    """Through run_prune: Fisher scores on the torch source, pruning_record.json, the map."""
    recipe = ctx.recipe
    data = recipe.data
    stage = stage_params(data, "prune")
    assert isinstance(stage, PruneStageParams)
    source = ctx.inputs.get("source")
    summary = run_prune(
        PruneStageConfig(
            model=str(ctx.inputs["model"]),
            out=str(ctx.out),
            prune=config,
            calibration=None if data is None else recipe.resolve(data.source),
            source=None if source is None else str(source),
            samples=stage.samples,
            batch_size=stage.batch_size,
            target=recipe.target,
            **_columns(recipe),
        )
    )
    return StageResult.pick(summary, ("importance", "flops_removed", "params_removed"))


def _run_quantize_stage(config: Any, spec: PassSpec, ctx: StageContext) -> StageResult:
    """Through run_quantize: calibration from [data], the ranges file and quantization report."""
    recipe = ctx.recipe
    data = recipe.data
    stage = stage_params(data, "quantize")
    assert isinstance(stage, QuantizeStageParams)
    data_spec = None if data is None else recipe.resolve(data.source)
    if "ranges_from_training" not in spec.params and _training_ranges_fit(ctx.inputs["model"], config):
        # A student distilled with qat = true carries its trained ranges: quantize with those.
        config = config.model_copy(update={"ranges_from_training": True})
    summary = run_quantize(
        QuantizeStageConfig(
            model=str(ctx.inputs["model"]),
            out=str(ctx.out),
            quantize=config,
            calibration=data_spec,
            eval=data_spec if config.max_accuracy_drop is not None else None,
            batch_size=stage.batch_size,
            pad_to=stage.pad_to,
            eval_limit=stage.eval_limit,
            eval_split=stage.eval_split,
            seed=recipe.seed,
            target=recipe.target,
            **_columns(recipe),
        )
    )
    return StageResult.pick(summary, ("quantized", "quantizable", "size_mb"))


def _training_ranges_fit(model: Path | str, config: Any) -> bool:
    """Whether the quantize stage's input carries QAT ranges that its settings can use."""
    artifact = ModelArtifact.open(model)
    if not carries_training_ranges(artifact.path, [step.step for step in artifact.meta.lineage]):
        return False
    try:
        check_training_options(config)
        # Resolved as a ranges-from-training run: "auto" keeps the 8-bit weights QAT trained.
        trained = config.model_copy(update={"ranges_from_training": True})
        check_training_settings(trained.resolved(), {}, config.preset)
    except UserError as exc:
        logger.warning("the model carries QAT ranges but the quantize settings differ (%s); calibrating", exc)
        return False
    return True


def _run_fuse_stage(config: Any, spec: PassSpec, ctx: StageContext) -> StageResult:
    summary = run_fuse(str(ctx.inputs["model"]), str(ctx.out), config, target=ctx.recipe.target)
    return StageResult(
        {k: v for k, v in summary.items() if isinstance(v, int | str) and k not in ("out", "seconds")}
    )


def _run_weight_only_stage(config: Any, spec: PassSpec, ctx: StageContext) -> StageResult:
    """Through run_weight_only: GPTQ calibrates on [data]'s train split, token parity on its test split."""
    recipe = ctx.recipe
    data_spec = None if recipe.data is None else recipe.resolve(recipe.data.source)
    summary = run_weight_only(
        WeightOnlyStageConfig(
            model=str(ctx.inputs["model"]),
            out=str(ctx.out),
            weight_only=config,
            calibration=data_spec if config.algo == "gptq" else None,
            prompts=data_spec,
            target=recipe.target,
            seed=recipe.seed,
        )
    )
    return StageResult(
        {
            "matmul_nbits": summary["matmul_nbits"],
            "accuracy_level": summary["accuracy_level"],
            "token_agreement": summary["fidelity"]["token_agreement"],
            "size_mb": summary["size_mb"],
        }
    )


def _run_fuse_decoder_stage(config: Any, spec: PassSpec, ctx: StageContext) -> StageResult:
    """Through run_fuse_decoder: greedy-token parity on [data]'s test prompts."""
    recipe = ctx.recipe
    data_spec = None if recipe.data is None else recipe.resolve(recipe.data.source)
    summary = run_fuse_decoder(
        ModelArtifact.open(ctx.inputs["model"]), ctx.out, config, target=recipe.target, prompts=data_spec
    )
    return StageResult({k: v for k, v in summary["fusions"].items() if v})


def _run_trim_vocab_stage(config: Any, spec: PassSpec, ctx: StageContext) -> StageResult:
    """Through run_trim_vocab: the corpus is [data] (its train split for a built-in set, the test
    split held out), tokenizer files and config.json rewritten beside the model."""
    recipe = ctx.recipe
    assert recipe.data is not None  # the recipe check asks passes for [data]
    columns = _columns(recipe)
    summary = run_trim_vocab(
        ctx.inputs["model"],
        ctx.out,
        recipe.resolve(recipe.data.source),
        config,
        text_column=columns["text_column"],
        text_pair_column=columns["text_pair_column"],
        overwrite=True,
        target=recipe.target,
    )
    return StageResult.pick(summary, ("vocab_before", "vocab_after", "coverage", "size_mb"))


_STAGE_ADAPTERS: dict[type[PassConfig], Callable[[Any, PassSpec, StageContext], StageResult]] = {
    DecoderFuseConfig: _run_fuse_decoder_stage,
    PruneConfig: _run_prune_stage,
    QuantizeConfig: _run_quantize_stage,
    FuseConfig: _run_fuse_stage,
    WeightOnlyConfig: _run_weight_only_stage,
    TrimVocabConfig: _run_trim_vocab_stage,
}


def _run_validate(ctx: StageContext) -> StageResult:
    from trimformer.pipeline.stages.validate import run_validate
    from trimformer.validation.validate import ValidateConfig, parse_grid

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
    if recipe.is_causal_lm:
        common["decoder"] = _decoder_settings(section, same)
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
            max_size_mb=section.gates.max_size_mb,
            **common,
        )
        try:
            report = run_validate(config)
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
            # Variants are measured, not gated (a causal LM's gates sit in its decoder settings).
            ungated = (
                {**common, "decoder": _decoder_settings(section, True)} if recipe.is_causal_lm else common
            )
            run_validate(
                ValidateConfig(
                    model=str(path), provider=provider, out=str(folder / role.split(":", 1)[1]), **ungated
                )
            )
    return StageResult({"gates": gates, "passed": all(g["passed"] for g in gates.values())})


def _decoder_settings(section: Any, same: bool) -> Any:
    """[validate]'s causal-LM keys as the decoder validation's config (unset: its defaults)."""
    from trimformer.validation.decoder import DecoderValidateConfig

    keys = ("perplexity_context", "perplexity_tokens", "prompts", "new_tokens")
    values = {key: getattr(section, key) for key in keys if getattr(section, key) is not None}
    if "runs" in section.model_fields_set:
        values["runs"] = section.runs
    if not same:
        gates = ("max_perplexity_increase", "min_token_agreement", "min_decode_speedup")
        values.update({key: getattr(section.gates, key) for key in gates})
    return DecoderValidateConfig(**values)


def _run_package(ctx: StageContext) -> StageResult:
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
        generation=recipe.package.generation,
        name=recipe.name,
        layout=recipe.package.layout,
        triton=None if recipe.package.triton is None else triton_options(recipe.package.triton),
        kserve=None if recipe.package.kserve is None else kserve_options(recipe.package.kserve),
    )
    return StageResult({"archive": Path(result.archive).name if result.archive else None})


# -- the plan -----------------------------------------------------------------------------------
def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"


# A stage's input: ("stage", name of an earlier stage) or ("external", a path or builtin spec).
_Ref = tuple[str, str]


class _Planner:
    """Adds stages in order, names them uniquely, and wires each input to a stage or a path."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.stages: list[Stage] = []
        # None: a causal LM that the train stage creates.
        self.source = recipe.source
        self.data_ext = {"data": recipe.resolve(recipe.data.source)} if recipe.data is not None else {}

    def add(self, stage: Stage) -> _Ref:
        stage.name = _unique(stage.name, {s.name for s in self.stages})
        self.stages.append(stage)
        return ("stage", stage.name)

    @staticmethod
    def wire(refs: dict[str, _Ref]) -> tuple[dict[str, str], dict[str, str]]:
        """(inputs, external) of a stage whose roles read ``refs``."""
        inputs = {role: value for role, (kind, value) in refs.items() if kind == "stage"}
        external = {role: value for role, (kind, value) in refs.items() if kind != "stage"}
        return inputs, external

    def export(self, name: str, model: _Ref) -> _Ref:
        inputs, external = self.wire({"model": model})
        params = {"task": self.recipe.model.task, **self.recipe.export.model_dump(mode="json")}
        return self.add(Stage(name, "export", params, _run_export, inputs, external, artifact=True))


def _train_lm(plan: _Planner) -> _Ref:
    recipe = plan.recipe
    if recipe.model.train is None:
        assert plan.source is not None
        return ("external", plan.source)
    params = {"seed": recipe.seed, "task": CAUSAL_LM, **_columns(recipe), **recipe.model.train.params}
    external = {"train_data": recipe.train_data}
    if plan.source is not None:
        external["model"] = plan.source
    return plan.add(Stage("train", "train", params, _run_train_lm, external=external))


def _train_and_distill(plan: _Planner) -> tuple[_Ref | None, _Ref | None]:
    """The torch stages: (the torch model to export, the reference stage for the gates)."""
    recipe = plan.recipe
    if recipe.model_is_artifact:
        return None, None
    if recipe.is_causal_lm:
        # The PyTorch model is the reference the exported decoder's gates compare with.
        trained = _train_lm(plan)
        return trained, trained
    assert plan.source is not None
    torch_model: _Ref = ("external", plan.source)
    if recipe.model.train is not None:
        params = {"seed": recipe.seed, **_columns(recipe), **recipe.model.train.params}
        external = {"model": plan.source, "train_data": recipe.train_data}
        torch_model = plan.add(Stage("train", "train", params, _run_train, external=external))
    if recipe.distill is None:
        return torch_model, None
    inputs, external = plan.wire({"teacher": torch_model})
    params = {"seed": recipe.seed, **_columns(recipe), **recipe.distill}
    distill = plan.add(
        Stage("distill", "distill", params, _run_distill, inputs, {**external, **plan.data_ext})
    )
    # The honest baseline for the gates is the teacher as FP32 ONNX, measured in the same run.
    reference = plan.export("export-teacher", torch_model)
    return distill, reference


def _depends_on_cpu(spec: PassSpec) -> bool:
    """A pass whose result depends on the CPU it runs on: an int8 preset or an accuracy level "auto"."""
    if spec.name == "quantize":
        return bool(spec.params.get("preset", AUTO_PRESET) == AUTO_PRESET)
    return spec.name == "weight-only" and spec.params.get("accuracy_level", "auto") == "auto"


def _pass_stages(plan: _Planner, current: _Ref, torch_model: _Ref | None) -> list[_Ref]:
    """One stage per [[passes]] entry, each reading the one before; returns every variant."""
    recipe = plan.recipe
    variants = [current]
    for index, spec in enumerate(recipe.passes):
        refs = {"model": current}
        if torch_model is not None and index == 0:
            # The PyTorch model matches the graph only before the first pass changes it.
            refs["source"] = torch_model
        inputs, external = plan.wire(refs)
        params: dict[str, Any] = {"pass": spec.name, "config": spec.params, "seed": recipe.seed}
        if _depends_on_cpu(spec):
            # "auto" resolves by CPU: a cached result from another CPU class is not this one's.
            params["cpu_class"] = cpu_class()
        if recipe.data is not None:
            params["data"] = _data_params(recipe)
        stage = Stage(
            spec.name,
            "pass",
            params,
            _pass_runner(index),
            inputs,
            {**external, **plan.data_ext},
            artifact=True,
        )
        current = plan.add(stage)
        variants.append(current)
    return variants


def _validate_and_package(plan: _Planner, final: _Ref, reference: _Ref, variants: list[_Ref]) -> None:
    recipe = plan.recipe
    if recipe.validate_ is None:
        return
    refs = {"model": final, "reference": reference}
    refs.update(
        {"variant:" + (value if kind == "stage" else "model"): (kind, value) for kind, value in variants}
    )
    inputs, external = plan.wire(refs)
    params = {"seed": recipe.seed, **_columns(recipe), **recipe.validate_.model_dump(mode="json")}
    validate = plan.add(
        Stage("validate", "validate", params, _run_validate, inputs, {**plan.data_ext, **external})
    )
    if recipe.package is None:
        return
    inputs, external = plan.wire({"validate": validate, "model": final})
    params = {**recipe.package.model_dump(mode="json"), "recipe_sha256": _sha(recipe.text)}
    plan.add(Stage("package", "package", params, _run_package, inputs, external))


def build_plan(recipe: Recipe) -> list[Stage]:
    """The ordered stages of a recipe (train, distill, export, passes, validate, package)."""
    plan = _Planner(recipe)
    torch_model, reference = _train_and_distill(plan)
    if torch_model is None:
        assert plan.source is not None
        current: _Ref = ("external", plan.source)
    else:
        current = plan.export("export", torch_model)
    variants = _pass_stages(plan, current, torch_model)
    _validate_and_package(plan, variants[-1], reference or current, variants)
    return plan.stages


def variant_stages(plan: list[Stage]) -> list[Stage]:
    return [stage for stage in plan if stage.artifact]


def _sha(text: str) -> str:
    return sha256_bytes(text.encode())
