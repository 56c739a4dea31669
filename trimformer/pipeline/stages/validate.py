"""The validate stage's adapter: torch-free validation, with a PyTorch reference opened here.

:mod:`trimformer.validation` measures with onnxruntime only and never imports torch; a reference
given as a PyTorch model folder (a teacher, the model an artifact was exported from) is loaded on
the torch side and handed to it as a runner. The CLI (``trimformer validate``) and recipes both
call :func:`run_validate`, so they compare against the same reference in the same way.
"""

from __future__ import annotations

from typing import Any

from trimformer.data import Encoder
from trimformer.validation.decoder import DecoderRunner
from trimformer.validation.reference import Reference
from trimformer.validation.runners import model_size_mb
from trimformer.validation.validate import ValidateConfig, validate

__all__ = ["open_decoder_reference", "open_source_reference", "run_validate"]


def open_source_reference(spec: str, threads: int) -> Reference:
    """A PyTorch model folder (or ``builtin:…``) as a reference, run with ``threads`` threads."""
    # Imported here: validating against an artifact reference (or none) need not load PyTorch.
    from trimformer.sources import load_source
    from trimformer.sources.runner import TorchRunner

    source = load_source(spec)
    encoder = Encoder(source.tokenizer, source.io.input_names, source.max_length, source.pad_token_id)
    return Reference(
        TorchRunner(source, threads), encoder, str(spec), model_size_mb(source.folder), source.task
    )


def open_decoder_reference(spec: str, threads: int) -> DecoderRunner:
    """A causal-LM PyTorch folder as a decoder reference, stepped with its own KV cache."""
    from trimformer.formats.tasks import CAUSAL_LM
    from trimformer.sources import load_source
    from trimformer.sources.causal_lm import TorchDecoder

    return TorchDecoder(load_source(spec, task=CAUSAL_LM), threads)


def run_validate(config: ValidateConfig) -> dict[str, Any]:
    """:func:`trimformer.validation.validate.validate` with PyTorch references allowed."""
    return validate(config, open_reference=open_source_reference, open_decoder=open_decoder_reference)
