"""The tokenizer files a model folder carries: ``tokenizer.json`` (what the runtime reads) and the
files Hugging Face loaders (and Optimum) read. One list, torch-free, for every side that copies,
ships or measures them."""

from __future__ import annotations

__all__ = ["TOKENIZER_FILES"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)
