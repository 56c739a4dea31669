"""Vocabulary trimming of tokenizer.json files: WordPiece and byte-level BPE built in code."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.builders import POSITIVE, make_bpe_tokenizer, make_tokenizer, sentence
from trimformer.data.vocabulary import (
    MIN_COVERAGE,
    plan_vocabulary,
    trimmed_tokenizer_json,
    trimmed_vocab_files,
)
from trimformer.errors import UserError

CORPUS = ["good phone today", "the car is bad", "my new phone was great", "hate this store"]


def _whole(tokenizer_json: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _trim(
    tokenizer: Tokenizer, corpus: list[str], keep: tuple[int, ...] = ()
) -> tuple[Tokenizer, Tokenizer, dict]:
    original = tokenizer.to_str()
    plan = plan_vocabulary(original, corpus, keep=keep)
    return _whole(original), _whole(trimmed_tokenizer_json(original, plan)), plan.old_to_new()


def test_wordpiece_corpus_tokenizes_to_the_same_tokens_with_remapped_ids() -> None:
    before, after, remap = _trim(make_tokenizer(), CORPUS, keep=(0,))
    assert after.get_vocab_size() < before.get_vocab_size()
    for text in CORPUS:
        old, new = before.encode(text), after.encode(text)
        assert new.tokens == old.tokens
        assert new.ids == [remap[i] for i in old.ids]
        assert after.decode(new.ids) == before.decode(old.ids)
    # The post-processor's [CLS]/[SEP] ids follow the remap (they are not where they were).
    assert after.encode("good").tokens[0] == "[CLS]"
    assert after.token_to_id("[PAD]") == 0  # the order is the original's: [PAD] stays first


def test_wordpiece_keeps_special_tokens_and_the_alphabet_so_unseen_words_still_split() -> None:
    before, after, _ = _trim(make_tokenizer(), CORPUS)
    # The unknown token and the post-processor's tokens are kept though no corpus text uses them;
    # [MASK] is a plain vocabulary entry of this tokenizer: kept only when asked (the stage asks
    # for the special tokens the folder's special_tokens_map.json declares).
    for special in ("[UNK]", "[CLS]", "[SEP]"):
        assert after.token_to_id(special) is not None
    assert after.token_to_id("[MASK]") is None
    assert after.token_to_id("love") is None  # a word the corpus never uses is gone
    # ... and falls back to letters, not to [UNK].
    assert before.encode("love").tokens == ["[CLS]", "love", "[SEP]"]
    assert after.encode("love").tokens == ["[CLS]", "l", "##o", "##v", "##e", "[SEP]"]


def test_byte_level_bpe_keeps_the_merges_that_build_corpus_tokens() -> None:
    tokenizer = make_bpe_tokenizer(vocab=400)
    rng = random.Random(3)
    corpus = [sentence(rng)[0] for _ in range(20)]
    before, after, remap = _trim(tokenizer, corpus)
    assert after.get_vocab_size() < before.get_vocab_size()
    for text in corpus:
        old, new = before.encode(text), after.encode(text)
        assert new.tokens == old.tokens
        assert new.ids == [remap[i] for i in old.ids]
    spec = json.loads(after.to_str())
    vocab = spec["model"]["vocab"]
    merges = spec["model"]["merges"]
    assert len(merges) < len(json.loads(tokenizer.to_str())["model"]["merges"])
    for left, right in (m.split(" ") if isinstance(m, str) else m for m in merges):
        assert left in vocab and right in vocab and left + right in vocab
    # The byte alphabet stays: any text still encodes, and decodes back unchanged.
    text = "zebra ünïcode 漢字 🙂"
    assert after.decode(after.encode(text).ids) == text
    assert all(t in vocab for t in pre_tokenizers.ByteLevel.alphabet())


def test_coverage_keeps_the_most_frequent_tokens_and_is_refused_under_the_threshold() -> None:
    original = make_tokenizer().to_str()
    corpus = ["good"] * 40 + ["phone"] * 19 + ["awful"]
    full = plan_vocabulary(original, corpus)
    partial = plan_vocabulary(original, corpus, coverage=0.95)
    assert full.coverage == 1.0
    assert MIN_COVERAGE <= partial.coverage < 1.0
    assert partial.vocab_after == full.vocab_after - 1  # "awful", the rarest, is dropped
    with pytest.raises(UserError, match=r"under the threshold 0\.95"):
        plan_vocabulary(original, corpus, coverage=0.5)


def test_refusals_name_what_is_wrong() -> None:
    original = make_tokenizer().to_str()
    with pytest.raises(UserError, match="no texts"):
        plan_vocabulary(original, [])
    unigram = Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0, False))
    with pytest.raises(UserError, match=r"supports WordPiece .* and byte-level BPE"):
        plan_vocabulary(unigram.to_str(), ["a b"])
    plain_bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    with pytest.raises(UserError, match="byte-level BPE only"):
        plan_vocabulary(plain_bpe.to_str(), ["ab"])
    spec = json.loads(original)
    spec["post_processor"]["special_tokens"]["[CLS]"]["ids"] = [999]
    with pytest.raises(UserError, match=r"special token id\(s\) \[999\].*would drop them"):
        plan_vocabulary(json.dumps(spec), CORPUS)


def test_slow_tokenizer_files_follow_the_trimmed_vocabulary() -> None:
    original = make_tokenizer().to_str()
    trimmed = trimmed_tokenizer_json(original, plan_vocabulary(original, CORPUS))
    files = trimmed_vocab_files(trimmed, ["vocab.txt", "tokenizer.json"])
    assert set(files) == {"vocab.txt"}
    tokenizer = Tokenizer.from_str(trimmed)
    lines = files["vocab.txt"].splitlines()
    assert lines == [tokenizer.id_to_token(i) for i in range(len(lines))]
    assert not set(POSITIVE) - {"good", "great"} & set(lines)
    bpe = make_bpe_tokenizer().to_str()
    trimmed_bpe = trimmed_tokenizer_json(bpe, plan_vocabulary(bpe, CORPUS))
    bpe_files = trimmed_vocab_files(trimmed_bpe, ["vocab.json", "merges.txt"])
    assert json.loads(bpe_files["vocab.json"]) == json.loads(trimmed_bpe)["model"]["vocab"]
    assert bpe_files["merges.txt"].startswith("#version")
    assert len(bpe_files["merges.txt"].splitlines()) - 1 == len(json.loads(trimmed_bpe)["model"]["merges"])
