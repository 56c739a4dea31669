"""The one text encoder: truncation, padding, masks, pairs, fixed widths, chosen inputs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.builders import make_tokenizer
from trimformer.runtime.encoding import KNOWN_INPUTS, TextEncoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(make_tokenizer().to_str(), KNOWN_INPUTS, max_length=6, pad_token_id=0)


def _id(token: str) -> int:
    found = make_tokenizer().token_to_id(token)
    assert found is not None
    return found


def test_rows_pad_to_the_longest_with_the_pad_id_and_a_zero_mask(encoder: TextEncoder) -> None:
    feeds = encoder(["good phone", "bad"])
    cls, sep = _id("[CLS]"), _id("[SEP]")
    np.testing.assert_array_equal(
        feeds["input_ids"], [[cls, _id("good"), _id("phone"), sep], [cls, _id("bad"), sep, 0]]
    )
    np.testing.assert_array_equal(feeds["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
    assert all(a.dtype == np.int64 for a in feeds.values())


def test_long_rows_are_cut_at_max_length(encoder: TextEncoder) -> None:
    feeds = encoder(["good " * 20])
    assert feeds["input_ids"].shape == (1, 6)
    assert feeds["input_ids"][0, -1] == _id("[SEP]")  # truncation keeps the special tokens


def test_pairs_get_token_type_one_on_the_second_text(encoder: TextEncoder) -> None:
    feeds = encoder(["good"], pairs=["bad"])
    np.testing.assert_array_equal(feeds["token_type_ids"], [[0, 0, 0, 1, 1]])


def test_pad_to_fixes_the_width_both_ways(encoder: TextEncoder) -> None:
    wide = encoder(["good"], pad_to=8)
    assert wide["input_ids"].shape == (1, 8) and wide["attention_mask"].sum() == 3
    narrow = encoder(["good phone today"], pad_to=2)
    np.testing.assert_array_equal(narrow["input_ids"], [[_id("[CLS]"), _id("good")]])


def test_only_the_named_inputs_in_their_order() -> None:
    plain = TextEncoder(make_tokenizer().to_str(), ("attention_mask", "input_ids"), 6, pad_token_id=1)
    feeds = plain(["good phone", "bad"])
    assert list(feeds) == ["attention_mask", "input_ids"]
    assert feeds["input_ids"][1, -1] == 1  # the model's own pad id


def test_no_texts_give_empty_batches(encoder: TextEncoder) -> None:
    feeds = encoder([])
    assert feeds["input_ids"].shape == (0, 1)
