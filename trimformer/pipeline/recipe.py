"""The recipe: one TOML file that declares every stage from a trained model to a shipped bundle.

::

    seed = 0
    [model]      source = "builtin:minilm" | model folder | exported artifact folder;
                 task = "causal-lm" for a decoder (source may then be left out: [model.train]
                 trains a new one)
    [model.train]   optional fine-tune first (the keys of TrainConfig; of LMConfig for a causal LM)
    [data]       source = "builtin:tweets" | .csv/.tsv/.jsonl, columns, calibration and eval sizes
    [distill]    optional teacher -> student (the keys of DistillConfig)
    [export]     opset, atol (default: the task's), a causal LM's parity_tokens and prompts
    [[passes]]   name = "prune", then that pass's own parameters; in order
    [validate]   providers, grid, gates; a causal LM's perplexity_context, perplexity_tokens,
                 prompts, new_tokens, runs and its own gates
    [package]    bundle options (needs [validate]: a bundle carries the metrics it was validated with);
                 a causal LM's default generation settings (``generation = {...}``)

Everything is checked before anything runs: unknown keys, wrong types, missing files, unknown
passes (against the registry), each pass's parameters (with the pass's own config class and its
ranges), the export opset, each stage's parameters (:mod:`trimformer.pipeline.stages.params`),
and a stage order that cannot work. Each problem is reported as ``FILE: KEY: problem; allowed: ...``.
Relative paths are read relative to the recipe file's folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

import trimformer.passes  # noqa: F401  (importing the package registers every pass)
from trimformer.errors import UserError
from trimformer.formats.onnx_ops import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from trimformer.formats.targets import AUTO_TARGET, check_target_name, check_validating_cpu
from trimformer.formats.tasks import CAUSAL_LM, TASK_NAMES
from trimformer.passes.base import PASS_REGISTRY, ConfigError, PassConfig, describe_error, pass_order
from trimformer.pipeline.stages.params import StageParams, stage_params_class
from trimformer.runtime.cpu import cpu_class
from trimformer.runtime.manifest import ManifestError, check_model_name

__all__ = [
    "EXPORT_DEFAULT_OPSET",
    "EXPORT_MAX_OPSET",
    "EXPORT_MIN_OPSET",
    "DataSection",
    "ExportSection",
    "Gates",
    "ModelSection",
    "PackageSection",
    "PassSpec",
    "Recipe",
    "ValidateSection",
    "known_passes",
    "load_recipe",
    "parse_recipe",
    "pass_config",
    "stage_params",
]

logger = logging.getLogger(__name__)

# The exporter's opset range, from its torch-free home (importing the exporter would load torch).
EXPORT_MIN_OPSET, EXPORT_MAX_OPSET, EXPORT_DEFAULT_OPSET = MIN_OPSET, MAX_OPSET, DEFAULT_OPSET

# Passes whose relative order is fixed: pruning edits float MatMul weights, so it must see the
# graph before fusion rewrites the attention block and before quantization replaces the weights.

# Keys of the stage functions' configs that the runner fills in itself.
_RUNNER_KEYS = {"model", "teacher", "data", "out", "overwrite", "seed", "checkpoint_dir"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSpec(_Strict):
    """``[model.train]``: fine-tune the model before anything else; keys checked against TrainConfig."""

    data: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {"data": value.get("data"), "params": {k: v for k, v in value.items() if k != "data"}}
        return value


class ModelSection(_Strict):
    # None only for a causal LM that [model.train] trains from scratch (checked in _check_files).
    source: str | None = None
    task: str | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        if value is not None and value not in TASK_NAMES:
            raise ValueError(f"must be one of {', '.join(TASK_NAMES)} (got {value!r})")
        return value

    train: TrainSpec | None = None


class DataSection(_Strict):
    source: str
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    # Unset: each stage's own default (trimformer.pipeline.stages.params, docs/RECIPES.md).
    calibration_samples: int | None = Field(default=None, ge=1)
    calibration_batch_size: int | None = Field(default=None, ge=1)
    # Fixed width for calibration batches, capped at the model's maximum length.
    calibration_pad_to: int | None = Field(default=None, ge=1)
    eval_split: Literal["auto", "all", "train", "dev", "test"] | None = None
    eval_limit: int | None = Field(default=None, ge=1)


class ExportSection(_Strict):
    opset: int = Field(default=EXPORT_DEFAULT_OPSET, ge=EXPORT_MIN_OPSET, le=EXPORT_MAX_OPSET)
    # None: the exporter's default for the task (1e-4 for encoders, 1e-3 for a causal LM's logits).
    atol: float | None = Field(default=None, gt=0)
    # A causal LM's greedy-token parity: new tokens per prompt, and the texts the prompts come
    # from (default: the recipe's [data] source).
    parity_tokens: int | None = Field(default=None, ge=1)
    prompts: str | None = None


class PassSpec(_Strict):
    """``[[passes]]``: ``name`` plus the pass's own parameters (validated by its config class)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, dict) and "params" not in value:
            return {"name": value.get("name"), "params": {k: v for k, v in value.items() if k != "name"}}
        return value


class Gates(_Strict):
    max_accuracy_drop: float | None = Field(default=None, ge=0)
    min_speedup: float | None = Field(default=None, gt=0)
    # The final model's files (model.onnx and external data), in MB.
    max_size_mb: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # A causal LM's gates (trimformer.validation.decoder), against the PyTorch model it came from.
    max_perplexity_increase: float | None = Field(default=None, ge=0)
    min_token_agreement: float | None = Field(default=None, ge=0, le=1)
    min_decode_speedup: float | None = Field(default=None, gt=0)


ENCODER_GATES = ("max_accuracy_drop", "min_speedup", "max_size_mb")
DECODER_GATES = ("max_perplexity_increase", "min_token_agreement", "min_decode_speedup")


class ValidateSection(_Strict):
    providers: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    grid: list[str] = Field(default_factory=lambda: ["1x128", "32x128"], min_length=1)
    split: Literal["auto", "all", "train", "dev", "test"] = "auto"
    limit: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    runs: int = Field(default=30, ge=1)
    warmup: int = Field(default=5, ge=0)
    min_seconds: float = Field(default=1.0, ge=0)
    natural_samples: int = Field(default=100, ge=1)
    # Measure every intermediate model too, for the report's accuracy/latency plot.
    variants: bool = True
    # A causal LM's measurements (trimformer.validation.decoder.DecoderValidateConfig).
    perplexity_context: int | None = Field(default=None, ge=2)
    perplexity_tokens: int | None = Field(default=None, ge=2)
    prompts: int | None = Field(default=None, ge=1)
    new_tokens: int | None = Field(default=None, ge=1)
    gates: Gates = Field(default_factory=lambda: Gates())

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class PackageSection(_Strict):
    ort_format: bool = False
    # A causal LM's default generation settings (GenerationSettings keys), checked when read.
    generation: dict[str, Any] | None = None
    # A serving layout written into the bundle (trimformer.packaging.triton.LAYOUTS) and, for
    # "triton", the repository's settings (TritonOptions keys), checked when read.
    layout: str | None = None
    triton: dict[str, Any] | None = None
    # layout = "kserve": the InferenceService's settings (KServeOptions keys; storage_uri required).
    kserve: dict[str, Any] | None = None

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str | None) -> str | None:
        from trimformer.packaging.triton import LAYOUTS

        if value is not None and value not in LAYOUTS:
            raise ValueError(f"unknown layout {value!r}; known: {', '.join(LAYOUTS)}")
        return value

    @field_validator("triton")
    @classmethod
    def _triton(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            triton_options(value)
        return value

    @field_validator("kserve")
    @classmethod
    def _kserve(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            kserve_options(value)
        return value

    @field_validator("generation")
    @classmethod
    def _settings(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from trimformer.runtime.sampling import GenerationSettings

            try:
                GenerationSettings.from_dict(value, "generation")
            except UserError as exc:
                raise ValueError(str(exc).removeprefix("generation: ")) from None
        return value


def _layout_options(kind: type, values: dict[str, Any], flag: str) -> Any:
    """A ``[package.<flag>]`` table as ``kind`` (a layout's options dataclass), every key and value
    checked; messages name the recipe's keys, not the command line's ``--<flag>-...`` options."""
    from dataclasses import fields

    known = sorted(f.name for f in fields(kind))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; known: {known}")
    try:
        options = kind(**values)
        options.check()
    except (TypeError, UserError) as exc:
        message = str(exc).replace(f"--layout {flag} needs ", "needs ")
        message = re.sub(rf"--{flag}-([a-z-]+)", lambda m: m.group(1).replace("-", "_"), message)
        raise ValueError(message) from None
    return options


def triton_options(values: dict[str, Any]) -> Any:
    """``[package.triton]`` as TritonOptions."""
    from trimformer.packaging.triton import TritonOptions

    return _layout_options(TritonOptions, values, "triton")


def kserve_options(values: dict[str, Any]) -> Any:
    """``[package.kserve]`` as KServeOptions."""
    from trimformer.packaging.kserve import KServeOptions

    return _layout_options(KServeOptions, values, "kserve")


class Recipe(_Strict):
    name: str | None = None
    description: str | None = None
    seed: int = 0
    # The deployment target every pass builds for (trimformer.formats.targets); "auto": this CPU's.
    target: str = AUTO_TARGET
    model: ModelSection
    data: DataSection | None = None
    distill: dict[str, Any] | None = None
    export: ExportSection = Field(default_factory=lambda: ExportSection())
    passes: list[PassSpec] = Field(default_factory=list)
    validate_: ValidateSection | None = Field(default=None, alias="validate")
    package: PackageSection | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        try:
            return check_target_name(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _validated_where_it_runs(self) -> Recipe:
        # A recipe that validates a model built for a CPU class this machine is not: refused before
        # anything runs rather than after hours of training.
        if self.validate_ is not None:
            try:
                check_validating_cpu(self.target, cpu_class(), "this recipe's model")
            except UserError as exc:
                raise ValueError(str(exc).replace("--target auto", 'target = "auto"')) from None
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        # The name becomes the bundle's model name, which servers put in URLs.
        if value is not None:
            try:
                check_model_name(value)
            except ManifestError as exc:
                raise ValueError(str(exc)) from None
        return value

    # Filled by parse_recipe, not by the file.
    _path: Path | None = PrivateAttr(None)
    _text: str = PrivateAttr("")
    _model_is_artifact: bool = PrivateAttr(False)
    _source_task: str | None = PrivateAttr(None)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def text(self) -> str:
        """The recipe file as written (it travels into the bundle)."""
        return self._text

    @property
    def model_is_artifact(self) -> bool:
        """model.source is an exported artifact: no train, distill or export stage."""
        return self._model_is_artifact

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path is not None else Path(".")

    def resolve(self, spec: str) -> str:
        """A path relative to the recipe's folder; ``builtin:`` names unchanged."""
        if spec.startswith("builtin:"):
            return spec
        path = Path(spec).expanduser()
        return str(path if path.is_absolute() else (self.folder / path))

    @property
    def is_causal_lm(self) -> bool:
        """task = "causal-lm", or no task and model.source holds a decoder (seen when checked)."""
        return (self.model.task or self._source_task) == CAUSAL_LM

    @property
    def source(self) -> str | None:
        """model.source resolved, or None for a causal LM trained from scratch."""
        return None if self.model.source is None else self.resolve(self.model.source)

    @property
    def train_data(self) -> str:
        assert self.data is not None
        spec = self.model.train.data if self.model.train and self.model.train.data else self.data.source
        return self.resolve(spec)


# -- registry and stage parameters --------------------------------------------------------------
def known_passes() -> dict[str, Any]:
    """The pass registry (every pass of trimformer.passes, and any registered since)."""
    return PASS_REGISTRY


# [data] keys -> the stage parameter each sets (where the stage has it).
_DATA_KEYS = {
    "calibration_samples": "samples",
    "calibration_batch_size": "batch_size",
    "calibration_pad_to": "pad_to",
    "eval_split": "eval_split",
    "eval_limit": "eval_limit",
}


def _given_stage_values(data: DataSection | None, pass_name: str) -> dict[str, Any]:
    fields = stage_params_class(pass_name).model_fields
    if data is None:
        return {}
    given = {param: getattr(data, key) for key, param in _DATA_KEYS.items() if getattr(data, key) is not None}
    return {param: value for param, value in given.items() if param in fields}


def stage_params(data: DataSection | None, pass_name: str) -> StageParams:
    """A pass stage's parameters: its defaults, with the [data] values the recipe gives."""
    return stage_params_class(pass_name).model_validate(_given_stage_values(data, pass_name))


def _pass_values(config_cls: type[PassConfig], spec: PassSpec, data: DataSection | None) -> dict[str, Any]:
    values = dict(spec.params)
    if (
        data is not None
        and data.calibration_samples is not None
        and "samples" in config_cls.model_fields
        and "samples" not in values
    ):
        # [data] calibration_samples is the recipe-wide calibration size; a pass's own wins.
        values["samples"] = data.calibration_samples
    return values


def pass_config(config_cls: type[PassConfig], spec: PassSpec, data: DataSection | None) -> PassConfig:
    """A [[passes]] entry's config, with the recipe-wide [data] values it takes."""
    return config_cls.model_validate(_pass_values(config_cls, spec, data))


def dataclass_model(cls: type, exclude: set[str]) -> type[BaseModel]:
    """A strict pydantic model with a dataclass's fields (minus ``exclude``), to check a table."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        fields[f.name] = (hints[f.name], default)
    return create_model(cls.__name__, __config__=ConfigDict(extra="forbid"), **fields)  # type: ignore[call-overload,no-any-return]


# -- messages -----------------------------------------------------------------------------------
def _loc_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _unwrap(annotation: Any) -> Any:
    """The model class inside Optional[...] / list[...]."""
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        inner = _unwrap(arg)
        if inner is not None:
            return inner
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The model class that holds ``loc[-1]`` (None when the path leaves the models)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = _field_by_key(cls, part)
        cls = _unwrap(field.annotation) if field is not None else None
    return cls


def _allowed_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that holds ``loc[-1]``."""
    cls = _model_at(root, loc)
    if cls is None:
        return []
    # PassSpec and TrainSpec gather the free keys under "params"; that name is not a key to write.
    hidden = {"params"} if cls in (PassSpec, TrainSpec) else set()
    return [field.alias or name for name, field in cls.model_fields.items() if name not in hidden]


def _field_by_key(cls: type[BaseModel], key: str) -> Any:
    for name, field in cls.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _describe(error: Any, root: type[BaseModel], prefix: tuple[Any, ...]) -> tuple[str, str]:
    loc = tuple(error["loc"])
    where = _loc_text(prefix + loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return where, "unknown key; allowed: " + ", ".join(_allowed_at(root, loc))
    if kind == "missing":
        return where, "missing required key"
    return where, describe_error(error, _model_at(root, loc))


def _raise(path: Path, problems: list[tuple[str, str]]) -> typing.NoReturn:
    first = [f"{path}: {where}: {what}" for where, what in problems[:3]]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise UserError("; ".join(first) + more)


def _pydantic_problems(
    exc: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()
) -> list[tuple[str, str]]:
    return [_describe(error, root, prefix) for error in exc.errors()]


# -- loading ------------------------------------------------------------------------------------
def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file; every problem is a UserError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {exc}") from exc
    return parse_recipe(text, path)


def parse_recipe(text: str, path: Path) -> Recipe:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise UserError("reading recipes on Python 3.10 needs tomli: pip install tomli") from None

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from exc
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        _raise(path, _pydantic_problems(exc, Recipe))
    recipe._path = path
    recipe._text = text
    _check(recipe, path)
    return recipe


def _check(recipe: Recipe, path: Path) -> None:
    problems: list[tuple[str, str]] = []
    problems += _check_files(recipe)
    problems += _check_stage_tables(recipe)
    problems += _check_passes(recipe)
    problems += _check_validate(recipe)
    problems += _check_order(recipe)
    if problems:
        _raise(path, problems)


def _check_files(recipe: Recipe) -> list[tuple[str, str]]:
    from trimformer.sources import BUILTIN_MODELS  # type: ignore[attr-defined]

    problems = []
    source = recipe.model.source
    if source is None:
        if not (recipe.is_causal_lm and recipe.model.train is not None):
            problems.append(
                (
                    "model.source",
                    "missing required key; only a causal LM trained from scratch "
                    '(task = "causal-lm" with a [model.train] table) may leave it out',
                )
            )
    elif source.startswith("builtin:"):
        if source not in BUILTIN_MODELS:
            problems.append(
                ("model.source", f"unknown built-in model {source!r}; known: {', '.join(BUILTIN_MODELS)}")
            )
    else:
        folder = Path(recipe.resolve(source))
        if not folder.exists():
            problems.append(
                (
                    "model.source",
                    f"{folder} does not exist; give a model folder, an artifact or builtin:minilm",
                )
            )
        elif not folder.is_dir():
            problems.append(("model.source", f"{folder} is a file; give the model's folder"))
        else:
            recipe._model_is_artifact = (folder / "model.onnx").is_file() and (
                folder / "trimformer.json"
            ).is_file()
            recipe._source_task = _folder_task(folder)
    data_specs = []
    if recipe.data is not None:
        data_specs.append(("data.source", recipe.data.source))
    if recipe.export.prompts is not None:
        data_specs.append(("export.prompts", recipe.export.prompts))
    if recipe.model.train is not None and recipe.model.train.data:
        data_specs.append(("model.train.data", recipe.model.train.data))
    for key, spec in data_specs:
        if spec.startswith("builtin:"):
            from trimformer.data import BUILTIN_DATASETS

            if spec not in BUILTIN_DATASETS:
                problems.append(
                    (key, f"unknown built-in dataset {spec!r}; known: {', '.join(BUILTIN_DATASETS)}")
                )
            continue
        file = Path(recipe.resolve(spec))
        if not file.is_file():
            problems.append(
                (key, f"{file} does not exist; give a .csv, .tsv or .jsonl file or builtin:tweets")
            )
        elif file.suffix.lower() not in (".csv", ".tsv", ".txt", ".jsonl", ".ndjson"):
            problems.append((key, f"{file.name} is not a dataset; allowed formats: .csv, .tsv, .jsonl"))
    return problems


def _folder_task(folder: Path) -> str | None:
    """causal-lm when the folder holds a decoder (an artifact's task, or a decoder family's
    config.json); None when it cannot tell (loading decides then)."""
    import json

    from trimformer.sources.families import DECODER_FAMILIES

    for name, key in (("trimformer.json", "task"), ("config.json", "model_type")):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value == CAUSAL_LM or value in DECODER_FAMILIES:
            return CAUSAL_LM
        if value is not None:
            return None
    return None


def _check_table(table: dict[str, Any], cls: type, where: str) -> list[tuple[str, str]]:
    model = dataclass_model(cls, _RUNNER_KEYS)
    problems = []
    for key in sorted(set(table) & _RUNNER_KEYS):
        problems.append((f"{where}.{key}", "set by the recipe (model, data, seed sections); remove it"))
    clean = {k: v for k, v in table.items() if k not in _RUNNER_KEYS}
    try:
        model.model_validate(clean)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, model, tuple(where.split(".")))
    return problems


def _check_stage_tables(recipe: Recipe) -> list[tuple[str, str]]:
    problems = []
    if recipe.model.train is not None and recipe.is_causal_lm:
        from trimformer.training.lm import LMConfig, LMShape

        params = dict(recipe.model.train.params)
        shape = params.pop("shape", {})
        problems += _check_table(params, LMConfig, "model.train")
        if not isinstance(shape, dict):
            problems.append(("model.train.shape", "must be a table (hidden_size, layers, heads, ...)"))
        else:
            problems += _check_table(shape, LMShape, "model.train.shape")
    elif recipe.model.train is not None:
        from trimformer.training.finetune import TrainConfig

        problems += _check_table(recipe.model.train.params, TrainConfig, "model.train")
    if recipe.distill is not None:
        from trimformer.training.distill.api import DistillConfig

        problems += _check_table(recipe.distill, DistillConfig, "distill")
    return problems


def _check_passes(recipe: Recipe) -> list[tuple[str, str]]:
    if not recipe.passes:
        return []
    registry = known_passes()
    problems = []
    for index, spec in enumerate(recipe.passes):
        if spec.name not in registry:
            known = ", ".join(sorted(registry)) or "none registered"
            problems.append((f"passes[{index}].name", f"unknown pass {spec.name!r}; known passes: {known}"))
            continue
        config_cls = registry[spec.name].config_cls
        try:
            pass_config(config_cls, spec, recipe.data)
        except ValidationError as exc:  # a registered config that is a plain pydantic model
            problems += _pydantic_problems(exc, config_cls, ("passes", index))
        except ConfigError as exc:
            problems += _pydantic_problems(exc.validation, config_cls, ("passes", index))
        try:
            stage_params(recipe.data, spec.name)
        except ConfigError as exc:  # [data] keys are checked by DataSection; this is the stage's word
            problems += _pydantic_problems(exc.validation, stage_params_class(spec.name), ("data",))
    return problems


def _check_validate(recipe: Recipe) -> list[tuple[str, str]]:
    section = recipe.validate_
    if section is None:
        return []
    from trimformer.runtime.session import PROVIDERS, resolve_provider
    from trimformer.validation.validate import parse_grid

    problems = []
    for i, provider in enumerate(section.providers):
        if provider not in PROVIDERS:
            problems.append(
                (
                    f"validate.providers[{i}]",
                    f"unknown provider {provider!r}; allowed: {', '.join(PROVIDERS)}",
                )
            )
            continue
        try:
            resolve_provider(provider)
        except UserError as exc:
            problems.append((f"validate.providers[{i}]", str(exc)))
    try:
        parse_grid(",".join(section.grid))
    except UserError as exc:
        problems.append(("validate.grid", str(exc)))
    return problems


def _decoder_pass_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Each pass gets the kind of graph its registry entry knows."""
    registry = known_passes()
    want = "decoder" if recipe.is_causal_lm else "encoder"
    problems = []
    for i, spec in enumerate(recipe.passes):
        entry = registry.get(spec.name)
        if entry is None or entry.models == want:
            continue
        if recipe.is_causal_lm:
            takes = ", ".join(sorted(n for n, e in registry.items() if e.models == "decoder"))
            problems.append(
                (
                    f"passes[{i}]",
                    f"the {spec.name} pass works on encoder graphs, not a causal LM (it takes: {takes})",
                )
            )
        else:
            problems.append(
                (
                    f"passes[{i}]",
                    f"the {spec.name} pass works on causal-LM graphs and this recipe is an encoder's",
                )
            )
    return problems


def _check_task_sections(recipe: Recipe) -> list[tuple[str, str]]:
    """What a causal LM cannot take (encoder passes and gates, distillation, ...), and the reverse."""
    problems: list[tuple[str, str]] = []
    gates = recipe.validate_.gates if recipe.validate_ else Gates()
    validate = recipe.validate_ or ValidateSection()
    problems += _decoder_pass_problems(recipe)
    if recipe.is_causal_lm:
        if recipe.distill is not None:
            problems.append(
                ("distill", "distillation is for encoders; a causal LM recipe trains, exports and validates")
            )
        problems += [
            (f"validate.gates.{name}", "an encoder gate; a causal LM takes " + ", ".join(DECODER_GATES))
            for name in ENCODER_GATES
            if getattr(gates, name) is not None
        ]
        if recipe.model_is_artifact and any(getattr(gates, name) is not None for name in DECODER_GATES):
            problems.append(
                (
                    "validate.gates",
                    "a causal LM's gates compare with its PyTorch model; give model.source as that folder",
                )
            )
        if validate.providers != ["cpu"]:
            problems.append(
                ("validate.providers", 'causal LMs are validated on the cpu provider for now; use ["cpu"]')
            )
        if recipe.package is not None and recipe.package.layout is not None:
            problems.append(
                ("package.layout", "the Triton layout does not support causal language models yet; remove it")
            )
        return problems
    decoder_only = [f"validate.gates.{name}" for name in DECODER_GATES if getattr(gates, name) is not None]
    decoder_only += [
        f"validate.{key}"
        for key in ("perplexity_context", "perplexity_tokens", "prompts", "new_tokens")
        if getattr(validate, key) is not None
    ]
    decoder_only += [
        f"export.{key}" for key in ("parity_tokens", "prompts") if getattr(recipe.export, key) is not None
    ]
    if recipe.package is not None and recipe.package.generation is not None:
        decoder_only.append("package.generation")
    problems += [(key, 'only for a causal LM (task = "causal-lm")') for key in decoder_only]
    return problems


def _check_order(recipe: Recipe) -> list[tuple[str, str]]:
    problems = _check_task_sections(recipe)
    needs_data = [
        name
        for name, present in (
            ("model.train", recipe.model.train is not None),
            ("distill", recipe.distill is not None),
            ("passes", bool(recipe.passes)),
            ("validate", recipe.validate_ is not None),
        )
        if present
    ]
    if needs_data and recipe.data is None:
        problems.append(("data", f"missing; {', '.join(needs_data)} need a [data] section with source = ..."))
    if recipe.model_is_artifact:
        for key, present in (
            ("model.train", recipe.model.train is not None),
            ("distill", recipe.distill is not None),
        ):
            if present:
                problems.append(
                    (
                        key,
                        "cannot run on an exported ONNX artifact; point model.source at the PyTorch model folder",
                    )
                )
    order = pass_order()
    chain = ", ".join(sorted(order, key=order.__getitem__))
    ranks = [(i, spec.name, order[spec.name]) for i, spec in enumerate(recipe.passes) if spec.name in order]
    for (i, name, rank), (j, later, later_rank) in itertools.pairwise(ranks):
        if later_rank < rank:
            problems.append(
                (
                    f"passes[{j}]",
                    f"{later!r} cannot run after {name!r} (passes[{i}]); order: {chain}",
                )
            )
    package = recipe.package
    if package is not None and package.triton is not None and package.layout is None:
        problems.append(("package.triton", 'the Triton repository\'s settings; add layout = "triton"'))
    if package is not None and package.kserve is not None and package.layout != "kserve":
        problems.append(("package.kserve", 'the InferenceService\'s settings; add layout = "kserve"'))
    if package is not None and package.layout == "kserve" and package.kserve is None:
        problems.append(
            ("package.kserve", "needs storage_uri: where the bundle's triton/ folder will be uploaded")
        )
    if recipe.package is not None and recipe.validate_ is None:
        problems.append(
            ("package", "needs a [validate] section: a bundle ships the metrics it was validated with")
        )
    gates = recipe.validate_.gates if recipe.validate_ else None
    if (
        gates
        and gates.min_speedup is not None
        and not recipe.passes
        and recipe.distill is None
        and not recipe.is_causal_lm
    ):
        problems.append(
            (
                "validate.gates.min_speedup",
                "nothing in the recipe can speed the model up (no distill, no passes)",
            )
        )
    return problems
