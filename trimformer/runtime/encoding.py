"""Texts -> the int64 arrays a model's graph takes: the one text encoder.

Truncate to the model's maximum length, pad each batch to its longest row (or to a fixed width)
with the pad id, mask 1 on real tokens, token type ids from the tokenizer. It lives in the
runtime, the lowest layer (nothing but `tokenizers` and numpy), so that a bundle encodes exactly
like validation, calibration and training, which use it through ``trimformer.data.Encoder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

__all__ = ["KNOWN_INPUTS", "EncodedText", "TextEncoder"]

KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EncodedText:
    """One text's tokens, before batching: what a batcher groups by length."""

    ids: tuple[int, ...]
    type_ids: tuple[int, ...]
    # The text was longer than the model's maximum length and was cut to it.
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


class TextEncoder:
    """Immutable after construction, so one instance can serve several threads at once."""

    def __init__(
        self, tokenizer_json: str, input_names: Sequence[str], max_length: int, pad_token_id: int
    ) -> None:
        self.input_names = tuple(input_names)
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        tokenizer = Tokenizer.from_str(tokenizer_json)
        # Configured once here and never again: tokenizers refuses a reconfiguration while
        # another thread encodes, and the runtime promises concurrent calls.
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.no_padding()
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce (added tokens included): the range a caller that
        sends ids instead of texts must stay in."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def __call__(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, pad_to: int | None = None
    ) -> dict[str, np.ndarray]:
        """Feeds for ``texts`` (and their ``pairs``); ``pad_to`` fixes the width (benchmarks'
        fixed shapes), cutting rows longer than it."""
        return self.collate(self.encode(texts, pairs), pad_to)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[EncodedText]:
        """Each text's tokens, truncated to the model's maximum length (and whether it was)."""
        if pairs is not None:
            encodings = self._tokenizer.encode_batch(list(zip(texts, pairs, strict=True)))
        else:
            encodings = self._tokenizer.encode_batch(list(texts))
        return [EncodedText(tuple(e.ids), tuple(e.type_ids), bool(e.overflowing)) for e in encodings]

    def collate(self, encodings: Sequence[EncodedText], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Rows of encoded texts as one batch's feeds, padded to the longest row (or ``pad_to``)."""
        width = max(1, pad_to or max((len(e.ids) for e in encodings), default=1))
        ids = np.full((len(encodings), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = min(len(enc.ids), width)
            ids[row, :n] = enc.ids[:n]
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids[:n]
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.input_names}
