"""A bundle's manifest as types: the one description packaging writes and the runtime reads.

:meth:`Manifest.to_dict` is what ``trimformer package`` writes to ``manifest.json``;
:meth:`Manifest.from_dict` reads it back and refuses a manifest whose structure is wrong with one
line naming the key (a hand-edited manifest with a fresh digest still fails here, not with a
KeyError inside a session). The graph's io, the tokenizer settings, the file table, the task and
labels are typed; the sections their own readers check (validation, smoke, lineage, recipe,
runtime, generation, ORT format) stay mappings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FileEntry",
    "Manifest",
    "ManifestError",
    "ModelSpec",
    "TensorSpec",
    "TokenizerFacts",
    "check_model_name",
]

# A model's name travels in URLs (/v2/models/{name}) and metric labels: a plain token.
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class ManifestError(ValueError):
    """The manifest's structure is not what this runtime reads (a key missing or of the wrong type)."""


def check_model_name(name: str) -> str:
    """``name`` if it can be a model name (letters, digits, ``.``, ``_``, ``-``; at most 128)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ManifestError(
            f"model name {name!r} must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise ManifestError(f"{where} has no {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ManifestError(f"{where}.{key} is {type(value).__name__}, not {_names(kind)}")
    return value


def _optional(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    return None if data.get(key) is None else _get(data, key, kind, where)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: dtype as numpy names it, dimensions as ints or axis names."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    dynamic_axes: Mapping[str, str] = field(default_factory=dict)

    @property
    def fixed_shape(self) -> list[int]:
        """The shape with every dynamic dimension as -1 (the Open Inference Protocol's way)."""
        return [d if isinstance(d, int) else -1 for d in self.shape]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "dynamic_axes": dict(self.dynamic_axes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TensorSpec:
        shape = _get(data, "shape", list, where)
        if not all(d is None or isinstance(d, int | str) for d in shape):
            raise ManifestError(f"{where}.shape has a dimension that is neither a number nor a name")
        return cls(
            name=_get(data, "name", str, where),
            dtype=_get(data, "dtype", str, where),
            shape=tuple(shape),
            dynamic_axes=dict(_optional(data, "dynamic_axes", dict, where) or {}),
        )


@dataclass(frozen=True)
class ModelSpec:
    """The graph as shipped: its file, io, opsets, producer, whether it is quantized, and the
    external-data files beside it."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ir_version: int
    opset: int | None
    opset_imports: Mapping[str, int]
    producer: str
    quantized: bool
    external_data: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "ir_version": self.ir_version,
            "opset": self.opset,
            "opset_imports": dict(sorted(self.opset_imports.items())),
            "producer": self.producer,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "quantized": self.quantized,
            "external_data": sorted(self.external_data),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> ModelSpec:
        def specs(key: str) -> tuple[TensorSpec, ...]:
            items = _get(data, key, list, where)
            if not items:
                raise ManifestError(f"{where}.{key} is empty")
            return tuple(TensorSpec.from_dict(item, f"{where}.{key}[{i}]") for i, item in enumerate(items))

        return cls(
            file=_get(data, "file", str, where),
            inputs=specs("inputs"),
            outputs=specs("outputs"),
            ir_version=_get(data, "ir_version", int, where),
            opset=_optional(data, "opset", int, where),
            opset_imports=dict(_optional(data, "opset_imports", dict, where) or {}),
            producer=str(data.get("producer") or ""),
            quantized=bool(_optional(data, "quantized", bool, where)),
            external_data=tuple(_optional(data, "external_data", list, where) or ()),
        )


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer file the runtime encodes with, every tokenizer file shipped, and the settings
    the model was validated with (truncation length, padding id, token type ids)."""

    file: str
    files: tuple[str, ...]
    max_length: int
    pad_token_id: int
    uses_token_type_ids: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "files": list(self.files),
            "max_length": self.max_length,
            "pad_token_id": self.pad_token_id,
            "uses_token_type_ids": self.uses_token_type_ids,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TokenizerFacts:
        max_length = _get(data, "max_length", int, where)
        if max_length < 1:
            raise ManifestError(f"{where}.max_length must be at least 1, got {max_length}")
        return cls(
            file=_get(data, "file", str, where),
            files=tuple(_optional(data, "files", list, where) or ()),
            max_length=max_length,
            pad_token_id=_get(data, "pad_token_id", int, where),
            uses_token_type_ids=bool(data.get("uses_token_type_ids", True)),
        )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` says. ``name`` is the model's name for servers and logs (the
    recipe's name or ``package --name``); bundles packaged before it existed have none."""

    format: str
    format_version: int
    trimformer: str
    task: str
    architecture: str | None
    labels: tuple[str, ...] | None
    model: ModelSpec
    tokenizer: TokenizerFacts
    files: Mapping[str, FileEntry]
    runtime: Mapping[str, Any]
    validation: Mapping[str, Any] | None
    smoke: Mapping[str, Any]
    ort_format: Mapping[str, Any] | None
    recipe: Mapping[str, Any] | None
    lineage: Mapping[str, Any]
    generation: Mapping[str, Any] | None = None
    name: str | None = None
    # The deployment target the model was built for (trimformer.formats.targets), when known.
    target: str | None = None
    # Serving layouts written into the bundle (``package --layout``): {"triton": {"repository": ...}}.
    layouts: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "format_version": self.format_version,
            "trimformer": self.trimformer,
            "task": self.task,
            "architecture": self.architecture,
            "labels": None if self.labels is None else list(self.labels),
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "files": {name: entry.to_dict() for name, entry in self.files.items()},
            "runtime": dict(self.runtime),
            "validation": None if self.validation is None else dict(self.validation),
            "smoke": dict(self.smoke),
            "ort_format": None if self.ort_format is None else dict(self.ort_format),
            "recipe": None if self.recipe is None else dict(self.recipe),
            "lineage": dict(self.lineage),
        }
        if self.generation is not None:
            out["generation"] = dict(self.generation)
        if self.name is not None:
            out["name"] = self.name
        if self.target is not None:
            out["target"] = self.target
        if self.layouts is not None:
            out["layouts"] = dict(self.layouts)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> Manifest:
        files = _get(data, "files", dict, where)
        labels = _optional(data, "labels", list, where)
        if labels is not None and not all(isinstance(label, str) for label in labels):
            raise ManifestError(f"{where}.labels must be strings")
        return cls(
            format=_get(data, "format", str, where),
            format_version=_get(data, "format_version", int, where),
            trimformer=str(data.get("trimformer") or ""),
            task=_get(data, "task", str, where),
            architecture=_optional(data, "architecture", str, where),
            labels=None if labels is None else tuple(labels),
            model=ModelSpec.from_dict(_get(data, "model", dict, where), f"{where}.model"),
            tokenizer=TokenizerFacts.from_dict(_get(data, "tokenizer", dict, where), f"{where}.tokenizer"),
            files={
                name: FileEntry(
                    _get(entry, "sha256", str, f"{where}.files[{name!r}]"),
                    _get(entry, "size", int, f"{where}.files[{name!r}]"),
                )
                for name, entry in files.items()
            },
            runtime=dict(_optional(data, "runtime", dict, where) or {}),
            validation=_optional(data, "validation", dict, where),
            smoke=dict(_optional(data, "smoke", dict, where) or {}),
            ort_format=_optional(data, "ort_format", dict, where),
            recipe=_optional(data, "recipe", dict, where),
            lineage=dict(_optional(data, "lineage", dict, where) or {}),
            generation=_optional(data, "generation", dict, where),
            name=None if data.get("name") is None else check_model_name(_get(data, "name", str, where)),
            target=_optional(data, "target", str, where),
            layouts=_optional(data, "layouts", dict, where),
        )
