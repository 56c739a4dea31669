"""The data side's encoder is the runtime's, built from a loaded tokenizer; batches in order."""

from __future__ import annotations

import numpy as np

from tests.builders import make_tokenizer
from trimformer.data import Encoder, TextDataset
from trimformer.data.tokenize import iter_batches
from trimformer.runtime.encoding import KNOWN_INPUTS, TextEncoder

TEXTS = ["good phone", "the worst store today, broken and sad", "", "a " * 300, "Café 👍 ok"]


def test_encoder_is_the_runtime_encoder_from_a_tokenizer() -> None:
    tokenizer = make_tokenizer()
    data_side = Encoder(tokenizer, KNOWN_INPUTS, 16, pad_token_id=0)
    runtime = TextEncoder(tokenizer.to_str(), KNOWN_INPUTS, 16, pad_token_id=0)
    assert isinstance(data_side, TextEncoder)
    for pad_to in (None, 24):
        ours, theirs = data_side(TEXTS, pad_to=pad_to), runtime(TEXTS, pad_to=pad_to)
        assert list(ours) == list(KNOWN_INPUTS)
        for name in KNOWN_INPUTS:
            np.testing.assert_array_equal(ours[name], theirs[name])
    # Truncation is configured on the encoder's own copy, not on the caller's tokenizer.
    assert tokenizer.truncation is None


def test_iter_batches_covers_the_rows_in_order_with_their_pairs() -> None:
    data = TextDataset(
        name="t", texts=["good", "bad", "ok", "sad", "nice"], pairs=["a", "b", "c", "d", "e"],
        labels=None, columns=("text", "pair"),
    )  # fmt: skip
    encoder = Encoder(make_tokenizer(), KNOWN_INPUTS, 16)
    batches = list(iter_batches(data, encoder, batch_size=2, pad_to=8))
    assert [rows for _, rows in batches] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    first, _ = batches[0]
    expected = encoder(["good", "bad"], ["a", "b"], pad_to=8)
    for name in KNOWN_INPUTS:
        np.testing.assert_array_equal(first[name], expected[name])
    assert first["token_type_ids"].max() == 1 and first["input_ids"].shape == (2, 8)
