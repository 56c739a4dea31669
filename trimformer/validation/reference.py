"""What validation compares a model against: another artifact, or a model opened by the caller.

An artifact reference is run here with onnxruntime. Any other reference (a PyTorch model folder)
needs torch, which validation never imports: the caller hands :func:`trimformer.validation.validate.validate`
a :data:`ReferenceOpener` that opens it (the validate stage passes the PyTorch one,
:func:`trimformer.pipeline.stages.validate.open_source_reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trimformer.artifact import ModelArtifact
from trimformer.errors import UserError
from trimformer.runtime.encoding import TextEncoder
from trimformer.validation.runners import ModelRunner, OrtRunner, ProviderOptions, model_size_mb

__all__ = ["Reference", "ReferenceOpener", "artifact_encoder", "load_reference"]


@dataclass(frozen=True)
class Reference:
    """An opened reference: it runs with its own tokenizer and inputs."""

    runner: ModelRunner
    encoder: TextEncoder
    name: str
    size_mb: float
    task: str


# (reference spec, thread count) -> the opened reference; raises UserError when it cannot.
ReferenceOpener = Callable[[str, int], Reference]


def artifact_encoder(artifact: ModelArtifact) -> TextEncoder:
    """The encoder an artifact's graph takes, from the ``tokenizer.json`` every artifact carries."""
    spec = artifact.meta.tokenizer
    path = artifact.path / spec.file
    if not path.is_file():
        raise UserError(f"{artifact.path} has no {spec.file}; export the model again")
    names = tuple(io.name for io in artifact.meta.inputs)
    try:
        return TextEncoder(path.read_text(encoding="utf-8"), names, spec.max_length, spec.pad_token_id)
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{path} is not a valid tokenizers file: {exc}") from exc


def load_reference(
    spec: str,
    threads: int,
    provider: str,
    options: ProviderOptions,
    open_other: ReferenceOpener | None = None,
) -> Reference:
    """An artifact folder as an onnxruntime reference on ``provider``; anything else through ``open_other``."""
    path = Path(spec)
    if (path / "trimformer.json").is_file():
        artifact = ModelArtifact.open(path)
        return Reference(
            OrtRunner(artifact, provider, threads, options),
            artifact_encoder(artifact),
            str(path),
            model_size_mb(path),
            artifact.task,
        )
    if open_other is None:
        raise UserError(
            f"the reference {spec} is not an artifact folder (no trimformer.json); pass an exported "
            "artifact, or validate with `trimformer validate` to compare against a PyTorch model"
        )
    return open_other(spec, threads)
