from __future__ import annotations

from tests.builders import make_bpe_tokenizer
from trimformer.data.prompts import first_halves


def test_first_halves_cut_each_text_and_stop_at_count() -> None:
    tokenizer = make_bpe_tokenizer()
    texts = ["the car is good and my phone is great today", "a", "", "the store was sad"]
    rows = first_halves(tokenizer, texts, count=2, longest=64)
    full = tokenizer.encode(texts[0]).ids
    assert rows[0] == full[: len(full) // 2]
    # "a" is <s> a: two tokens, kept whole; the count stops before the third text.
    assert rows[1] == tokenizer.encode("a").ids and len(rows) == 2
    assert all(len(r) <= 3 for r in first_halves(tokenizer, texts, count=10, longest=3))
