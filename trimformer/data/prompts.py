"""Prompts from held-out texts, for a causal LM's export parity, decoder passes and validation.

Each text's first half (at least 2 tokens, when the text has them) becomes a prompt, cut to
``longest`` tokens so the continuation still fits the context. One rule, so the export and
validation compare on prompts built the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trimformer.errors import UserError

__all__ = ["MIN_PROMPTS", "PARITY_PROMPTS", "first_halves", "held_out_prompts"]

PARITY_PROMPTS = (
    "The weather today is",
    "I can't believe that",
    "My favourite thing about the weekend",
    "Yesterday I went to the",
    "The best way to learn a language is",
    "Please don't tell anyone, but",
    "When the train finally arrived,",
    "Our team just shipped",
    "the coffee here is",
    "Happy birthday to my",
    "Why does my phone always",
    "Just finished reading a book about",
    "So excited for the concert tonight because",
    "Traffic on the highway was",
    "lol this is the funniest",
    "Can someone explain why",
    "New blog post: how we",
    "Good morning everyone, today",
    "The new update broke",
    "I miss the days when",
    "Dinner tonight: pasta with",
    "Watching the game and",
    "Never again will I",
    "Thanks so much for",
)
MIN_PROMPTS = 20


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


def held_out_prompts(
    tokenizer: Any, max_length: int, data: str | None, count: int, reserve: int
) -> list[list[int]]:
    """``count`` prompts, each leaving ``reserve`` positions of a ``max_length`` context free: each
    test text's first half of ``data``, or without data the built-in :data:`PARITY_PROMPTS`."""
    longest = max(1, min(64, max_length - reserve))
    if data is None:  # the built-in prompts are prompts already, not texts to halve
        encoded = (tokenizer.encode(text).ids for text in PARITY_PROMPTS)
        prompts = [ids[:longest] for ids in encoded if ids][:count]
    else:
        from trimformer.data.datasets import load_dataset

        texts = load_dataset(data, split="auto" if not data.startswith("builtin:") else "test").texts
        prompts = first_halves(tokenizer, texts, count, longest)
    if len(prompts) < min(count, MIN_PROMPTS):
        raise UserError(
            f"only {len(prompts)} non-empty prompts in {data}; parity needs at least {MIN_PROMPTS}"
        )
    return prompts
