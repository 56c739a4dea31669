"""Tokenizers from model folders, as `tokenizers.Tokenizer` objects (the runtime needs nothing else)."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer

from trimformer.errors import UserError
from trimformer.formats.tokenizer_files import TOKENIZER_FILES

__all__ = ["TOKENIZER_FILES", "load_tokenizer"]

logger = logging.getLogger(__name__)


def load_tokenizer(folder: Path) -> Tokenizer:
    """Read ``tokenizer.json``, or convert a slow tokenizer (vocab.txt, ...) with transformers."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:
            raise UserError(f"{path} is not a valid tokenizers file: {exc}") from exc
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
        backend = getattr(hf, "backend_tokenizer", None)
    except Exception as exc:
        raise UserError(
            f"no tokenizer in {folder}: add tokenizer.json (or vocab.txt for BERT) next to the model"
        ) from exc
    if backend is None:
        raise UserError(f"the tokenizer in {folder} has no fast version; add a tokenizer.json")
    return Tokenizer.from_str(backend.to_str())
