"""ModelArtifact: the one thing every stage reads and writes.

An artifact is a folder::

    model.onnx            the graph (weights inline, or in model.onnx.data when over 2 GB)
    trimformer.json       task, labels, io spec, tokenizer settings, lineage of every step
    tokenizer.json        a `tokenizers` file (plus whatever tokenizer files the source had)
    config.json           the source model's configuration (labels for Hugging Face loaders)

Stages never reach back into an earlier stage's Python objects: they open an artifact folder,
and write a new one with :meth:`ModelArtifact.derive`, which copies the side files and appends
one lineage entry (step, parameters, input hash, output hash).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trimformer import __version__
from trimformer.errors import UserError
from trimformer.formats.tasks import TASK_NAMES
from trimformer.fsutil import atomic_output_dir, hash_files, sha256_file
from trimformer.onnx_io import check_external_data, load_onnx, save_onnx

__all__ = [
    "ARTIFACT_META",
    "MODEL_FILE",
    "ArtifactMeta",
    "IOSpec",
    "LineageStep",
    "ModelArtifact",
    "TokenizerSpec",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
ARTIFACT_META = "trimformer.json"
# meta.extras key: the local PyTorch folder an export came from (read by the prune stage, never shipped).
EXPORTED_FROM = "exported_from"
REPORT_DIRS = ("report",)
# The task names come from the registry (formats/tasks.py); a name outside it is refused at load.
Task = str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IOSpec(_Strict):
    name: str
    dtype: str
    # Dimension names ("batch", "sequence") are dynamic; integers are fixed.
    shape: list[str | int]


class TokenizerSpec(_Strict):
    file: str = "tokenizer.json"
    max_length: int = 128
    pad_token_id: int = 0
    # Which of the tokenizer's outputs feed which graph input.
    uses_token_type_ids: bool = True


class LineageStep(_Strict):
    step: str
    params: dict[str, Any] = Field(default_factory=dict)
    input_hash: str | None = None
    output_hash: str | None = None
    trimformer: str = __version__
    seconds: float | None = None
    stats: dict[str, Any] = Field(default_factory=dict)


class ArtifactMeta(_Strict):
    format_version: int = 1
    task: Task
    architecture: str
    labels: list[str] | None = None
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    tokenizer: TokenizerSpec
    opset: int
    source_hash: str | None = None
    lineage: list[LineageStep] = Field(default_factory=list)
    # Free-form facts that passes want to hand to later passes (calibration ranges file, ...).
    extras: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASK_NAMES:
            raise ValueError(f"unknown task {value!r}; known tasks: {', '.join(TASK_NAMES)}")
        return value


class ModelArtifact:
    """An artifact folder on disk, opened read-only."""

    def __init__(self, path: Path, meta: ArtifactMeta) -> None:
        self.path = Path(path)
        self.meta = meta

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> ModelArtifact:
        path = Path(path)
        if not path.exists():
            raise UserError(f"model folder {path} does not exist")
        if not path.is_dir():
            raise UserError(f"{path} is not an artifact folder; pass the folder that holds model.onnx")
        meta_file = path / ARTIFACT_META
        if not (path / MODEL_FILE).is_file() or not meta_file.is_file():
            raise UserError(
                f"{path} is not a trimformer artifact (needs {MODEL_FILE} and {ARTIFACT_META}); "
                "create one with `trimformer export`"
            )
        try:
            meta = ArtifactMeta.model_validate_json(meta_file.read_text(encoding="utf-8"))
        except (ValidationError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"{meta_file} is malformed ({first}); re-export the model") from exc
        return cls(path, meta)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def labels(self) -> list[str] | None:
        return self.meta.labels

    @property
    def task(self) -> str:
        return self.meta.task

    def load_model(self, load_weights: bool = True) -> onnx.ModelProto:
        return load_onnx(self.model_path, load_weights=load_weights)

    def model_files(self) -> list[Path]:
        """model.onnx and its external-data files (validated to stay inside the folder)."""
        proto = load_onnx(self.model_path, load_weights=False)
        return [self.model_path, *check_external_data(proto, self.path)]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.model_files())

    def model_hash(self) -> str:
        files = self.model_files()
        if len(files) == 1:
            return "sha256:" + sha256_file(files[0])
        # External-data paths come back resolved; so must the root, or a relative folder breaks.
        return "sha256:" + hash_files([p.resolve() for p in files], self.path.resolve())

    def side_files(self) -> list[Path]:
        """Everything in the folder except the model and the metadata (tokenizer, config, ...)."""
        model_files = {p.resolve() for p in self.model_files()}
        out = []
        for item in sorted(self.path.rglob("*")):
            rel = item.relative_to(self.path)
            # Validation reports describe this model, not the one derived from it.
            if rel.parts[0] in REPORT_DIRS:
                continue
            if item.is_file() and item.resolve() not in model_files and item.name != ARTIFACT_META:
                out.append(item)
        return out

    # -- writing -----------------------------------------------------------------------------
    @contextmanager
    def derive(
        self,
        out: str | Path,
        step: str,
        params: dict[str, Any],
        overwrite: bool = False,
    ) -> Iterator[DerivedArtifact]:
        """Write a new artifact from this one; the caller sets ``.model`` and may edit ``.meta``."""
        started = time.perf_counter()
        input_hash = self.model_hash()
        with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
            for side in self.side_files():
                rel = side.relative_to(self.path)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(side, tmp / rel)
            derived = DerivedArtifact(tmp, self.meta.model_copy(deep=True))
            yield derived
            if derived.model is None:
                raise RuntimeError(f"step {step!r} produced no model")
            derived.finish(step, params, input_hash, time.perf_counter() - started)

    def __repr__(self) -> str:
        return f"ModelArtifact({str(self.path)!r}, task={self.meta.task!r})"


class DerivedArtifact:
    """A new artifact being written into a temporary folder."""

    def __init__(self, tmp: Path, meta: ArtifactMeta) -> None:
        self.path = tmp
        self.meta = meta
        self.model: onnx.ModelProto | None = None
        self.stats: dict[str, Any] = {}

    def finish(self, step: str, params: dict[str, Any], input_hash: str | None, seconds: float) -> None:
        assert self.model is not None
        save_onnx(self.model, self.path / MODEL_FILE)
        output_hash = ModelArtifact(self.path, self.meta).model_hash()
        self.meta.lineage.append(
            LineageStep(
                step=step,
                params=_jsonable(params),
                input_hash=input_hash,
                output_hash=output_hash,
                seconds=round(seconds, 3),
                stats=_jsonable(self.stats),
            )
        )
        write_meta(self.path, self.meta)


def write_meta(folder: Path, meta: ArtifactMeta) -> None:
    text = json.dumps(meta.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    (folder / ARTIFACT_META).write_text(text, encoding="utf-8")


def _jsonable(value: Any) -> Any:
    """Make parameters JSON-safe and free of machine-specific detail that would break caching."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return value.name
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
