"""Prompts from held-out texts, for a causal LM's export parity and validation.

Each text's first half (at least 2 tokens, when the text has them) becomes a prompt, cut to
``longest`` tokens so the continuation still fits the context. One rule, so the export and
validation compare on prompts built the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["first_halves"]


def first_halves(tokenizer: Any, texts: Iterable[str], count: int, longest: int) -> list[list[int]]:
    """Token ids of up to ``count`` prompts (``tokenizer`` is a ``tokenizers.Tokenizer``)."""
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        ids = ids[: min(longest, max(2, len(ids) // 2))]
        if ids:
            rows.append(ids)
        if len(rows) == count:
            break
    return rows
