"""Vocabulary trimming of a ``tokenizer.json``: keep the tokens a domain corpus uses, remap the ids.

``tokenizers`` has no trimming of its own (its maintainers point at remapping the embedding rows by
hand), so this edits the serialized tokenizer: the model's vocabulary, BPE merges, added tokens,
the post-processor's special-token ids and the padding id, all with one old->new id map that keeps
the original order (``[PAD]`` stays 0).

What is kept, so that the corpus tokenizes exactly as before:

* every token the corpus's tokenization produces and every added (special) token;
* WordPiece: the single characters of the corpus (after the normalizer) and of printable ASCII, as
  word starts and as continuations, so an unseen word still splits into pieces instead of becoming
  ``[UNK]``. Greedy longest-match only ever picks a kept token for a corpus word: a longer match
  that was dropped was never chosen, so corpus words split as before;
* byte-level BPE: the 256-symbol byte alphabet (every text stays representable) and, for each kept
  token, the merge that forms it and both of its parts, recursively: every intermediate product of
  a corpus word's merges is kept, and a dropped merge never fired on a corpus word, so merges fire
  in the same order.

The torch-free half lives here (the runtime's tokenizer is a ``tokenizers.Tokenizer``); the
embedding rows are gathered by ``trimformer.passes.trim_vocab``.
"""

from __future__ import annotations

import copy
import json
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers

from trimformer.errors import UserError

__all__ = [
    "MIN_COVERAGE",
    "SUPPORTED_FAMILIES",
    "VocabularyPlan",
    "VocabularyTexts",
    "count_corpus_tokens",
    "encode_whole",
    "plan_vocabulary",
    "trimmed_tokenizer_json",
    "trimmed_vocab_files",
]

SUPPORTED_FAMILIES = ("WordPiece", "BPE")
# Below this share of the corpus's token occurrences, too many corpus texts would tokenize
# differently for the trimmed model to stand for the original on its own domain.
MIN_COVERAGE = 0.95
_ENCODE_BATCH = 512


@dataclass(frozen=True)
class VocabularyTexts:
    """What trimming reads besides the graph: the artifact's tokenizer and the texts."""

    tokenizer_json: str
    max_length: int
    pad_token_id: int
    corpus: Sequence[str]
    holdout: Sequence[str] = ()
    # The model is a classifier: held-out agreement is of labels (else the outputs' cosine).
    classifier: bool = False
    # Special tokens the model folder declares (special_tokens_map.json, tokenizer_config.json):
    # kept whether or not the corpus uses them.
    special_tokens: tuple[str, ...] = ()

    def keep_ids(self) -> list[int]:
        """The declared special tokens' ids (those the vocabulary has), and every id up to the
        padding id so that it keeps its value: graphs compare ``input_ids`` with it (RoBERTa's
        position ids), and the artifact's metadata records it."""
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        ids = [tokenizer.token_to_id(token) for token in self.special_tokens]
        return [*range(self.pad_token_id + 1), *(i for i in ids if i is not None)]


@dataclass(frozen=True)
class VocabularyPlan:
    """Which original ids survive, in new-id order (ascending, so the order is the original's)."""

    family: str
    kept: tuple[int, ...]
    vocab_before: int
    corpus_texts: int
    corpus_tokens: int
    # Share of the corpus's token occurrences whose token is kept (1.0: the corpus is unchanged).
    coverage: float
    # Tokens the corpus does not use, kept so that other texts still tokenize (alphabet, merges).
    kept_for_fallback: int

    @property
    def vocab_after(self) -> int:
        return len(self.kept)

    def old_to_new(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}


def _counting_tokenizer(tokenizer_json: str) -> Tokenizer:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def encode_whole(tokenizer_json: str, texts: Sequence[str]) -> list[list[tuple[int, str]]]:
    """Each text's (id, token) pairs, whole (no truncation, no padding)."""
    tokenizer = _counting_tokenizer(tokenizer_json)
    out: list[list[tuple[int, str]]] = []
    for start in range(0, len(texts), _ENCODE_BATCH):
        for encoding in tokenizer.encode_batch(list(texts[start : start + _ENCODE_BATCH])):
            out.append(list(zip(encoding.ids, encoding.tokens, strict=True)))
    return out


def count_corpus_tokens(tokenizer_json: str, texts: Sequence[str]) -> Counter[int]:
    """How often each id occurs when the corpus is tokenized (whole texts, no truncation)."""
    tokenizer = _counting_tokenizer(tokenizer_json)
    counts: Counter[int] = Counter()
    for start in range(0, len(texts), _ENCODE_BATCH):
        for encoding in tokenizer.encode_batch(list(texts[start : start + _ENCODE_BATCH])):
            counts.update(encoding.ids)
    return counts


def _family(spec: dict[str, Any]) -> str:
    family = str(spec.get("model", {}).get("type"))
    if family not in SUPPORTED_FAMILIES:
        raise UserError(
            f"trim-vocab supports WordPiece (BERT family) and byte-level BPE (GPT-2, RoBERTa) "
            f"tokenizers; this tokenizer.json has a {family} model"
        )
    if family == "BPE" and not _is_byte_level(spec):
        raise UserError(
            "trim-vocab supports byte-level BPE only (a ByteLevel pre-tokenizer, as GPT-2 and RoBERTa); "
            "this BPE tokenizer has none"
        )
    return family


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(spec.get("pre_tokenizer"))


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """BPE merges as pairs: tokenizers writes ``["a", "b"]`` lists (0.20+) or ``"a b"`` strings."""
    pairs = []
    for merge in merges:
        if isinstance(merge, str):
            left, _, right = merge.partition(" ")
            pairs.append((left, right))
        else:
            pairs.append((str(merge[0]), str(merge[1])))
    return pairs


def _wordpiece_fallback(spec: dict[str, Any], vocab: dict[str, int], texts: Sequence[str]) -> set[int]:
    """Single characters, word-initial and continuing, that any text of the domain may need."""
    normalizer = Tokenizer.from_str(json.dumps(spec)).normalizer
    chars = set(string.printable.strip())
    for text in texts:
        chars.update(normalizer.normalize_str(text) if normalizer is not None else text)
    prefix = str(spec["model"].get("continuing_subword_prefix") or "##")
    return {vocab[t] for c in chars for t in (c, prefix + c) if t in vocab}


def _bpe_closure(spec: dict[str, Any], vocab: dict[str, int], kept: set[int]) -> set[int]:
    """The byte alphabet plus, for every kept token, the parts of the merges that form it."""
    by_id = {i: t for t, i in vocab.items()}
    formed_by: dict[str, list[tuple[str, str]]] = {}
    for left, right in _merge_pairs(spec["model"].get("merges", [])):
        formed_by.setdefault(left + right, []).append((left, right))
    closure = {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab} | set(kept)
    stack = [by_id[i] for i in closure if i in by_id]
    while stack:
        for pair in formed_by.get(stack.pop(), ()):
            for part in pair:
                if part in vocab and vocab[part] not in closure:
                    closure.add(vocab[part])
                    stack.append(part)
    return closure


def _map_ids(node: Any, change: Callable[[int], int]) -> Any:
    """A post-processor with ``change`` applied to every special-token id it names
    (TemplateProcessing's ``ids``, Bert/RobertaProcessing's ``[token, id]`` pairs, Sequence's
    ``processors``): the one walker of that structure, for reading the ids and for remapping them."""
    if isinstance(node, list):
        return [_map_ids(v, change) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list):
            out[key] = [change(int(i)) for i in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:
            out[key] = [value[0], change(int(value[1]))]
        else:
            out[key] = _map_ids(value, change)
    return out


def _referenced_ids(node: Any) -> set[int]:
    found: set[int] = set()

    def record(token_id: int) -> int:
        found.add(token_id)
        return token_id

    _map_ids(node, record)
    return found


def _special_ids(spec: dict[str, Any], vocab_size: int) -> set[int]:
    """Added tokens, the unknown token, the padding id and the post-processor's ids: never dropped.
    An id the vocabulary does not have would be dropped by any trimming: refused."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    specials = {int(t["id"]) for t in spec.get("added_tokens", [])}
    unk = spec["model"].get("unk_token")
    if unk is not None and unk in vocab:
        specials.add(vocab[unk])
    padding = spec.get("padding") or {}
    named = _referenced_ids(spec.get("post_processor"))
    if padding.get("pad_id") is not None:
        named.add(int(padding["pad_id"]))
    known = set(vocab.values()) | specials
    missing = sorted(named - known)
    if missing:
        raise UserError(
            f"the tokenizer's post-processor or padding names special token id(s) {missing} that its "
            f"vocabulary of {vocab_size} does not hold; trimming would drop them: fix the tokenizer.json first"
        )
    return specials | named


def _covering(counts: Counter[int], coverage: float) -> set[int]:
    """The most frequent ids whose occurrences reach ``coverage`` of the corpus's tokens."""
    if coverage >= 1.0:
        return set(counts)
    need = coverage * sum(counts.values())
    kept: set[int] = set()
    seen = 0
    for token, count in counts.most_common():
        if seen >= need:
            break
        kept.add(token)
        seen += count
    return kept


def plan_vocabulary(
    tokenizer_json: str, texts: Sequence[str], coverage: float = 1.0, keep: Iterable[int] = ()
) -> VocabularyPlan:
    """What to keep for ``texts``; ``coverage`` below 1.0 keeps only the most frequent tokens;
    ``keep``: ids kept whatever the corpus (the artifact's padding id)."""
    if not texts:
        raise UserError("the corpus has no texts; trim-vocab keeps the tokens a corpus uses, so give it some")
    if not MIN_COVERAGE <= coverage <= 1.0:
        raise UserError(
            f"--coverage {coverage} is under the threshold {MIN_COVERAGE}: a vocabulary covering less of "
            f"the corpus's tokens changes too many of its texts; use a value in [{MIN_COVERAGE}, 1]"
        )
    spec = json.loads(tokenizer_json)
    family = _family(spec)
    vocab: dict[str, int] = spec["model"]["vocab"]
    counts = count_corpus_tokens(tokenizer_json, texts)
    used = _covering(counts, coverage)
    specials = _special_ids(spec, vocab_size=Tokenizer.from_str(tokenizer_json).get_vocab_size(True))
    if family == "WordPiece":
        fallback = _wordpiece_fallback(spec, vocab, texts)
        kept = used | specials | fallback | set(keep)
    else:
        kept = _bpe_closure(spec, vocab, used | specials | set(keep))
    total = sum(counts.values())
    covered = sum(c for t, c in counts.items() if t in kept)
    vocab_before = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    return VocabularyPlan(
        family=family,
        kept=tuple(sorted(kept)),
        vocab_before=int(vocab_before),
        corpus_texts=len(texts),
        corpus_tokens=total,
        coverage=covered / total if total else 1.0,
        kept_for_fallback=len(kept - used - specials - set(keep)),
    )


def trimmed_tokenizer_json(tokenizer_json: str, plan: VocabularyPlan) -> str:
    """The tokenizer.json of the trimmed vocabulary (same normalizer, pre-tokenizer, decoder)."""
    spec = copy.deepcopy(json.loads(tokenizer_json))
    remap = plan.old_to_new()
    model = spec["model"]
    model["vocab"] = {
        t: remap[i] for t, i in sorted(model["vocab"].items(), key=lambda x: x[1]) if i in remap
    }
    if plan.family == "BPE":
        kept_tokens = set(model["vocab"])
        merges = model.get("merges", [])
        model["merges"] = [
            m
            for m, (left, right) in zip(merges, _merge_pairs(merges), strict=True)
            if {left, right, left + right} <= kept_tokens
        ]
    for token in spec.get("added_tokens", []):
        token["id"] = remap[int(token["id"])]
    if spec.get("post_processor") is not None:
        spec["post_processor"] = _map_ids(spec["post_processor"], remap.__getitem__)
    padding = spec.get("padding")
    if padding is not None and padding.get("pad_id") is not None:
        padding["pad_id"] = remap[int(padding["pad_id"])]
    return json.dumps(spec, ensure_ascii=False)


def trimmed_vocab_files(tokenizer_json: str, names: Iterable[str]) -> dict[str, str]:
    """The slow-tokenizer files among ``names`` (vocab.txt, vocab.json, merges.txt) rewritten from
    the trimmed tokenizer.json, so Hugging Face loaders that read them agree with it."""
    spec = json.loads(tokenizer_json)
    model = spec["model"]
    ordered = [t for t, _ in sorted(model["vocab"].items(), key=lambda x: x[1])]
    files: dict[str, str] = {}
    names = set(names)
    if "vocab.txt" in names:
        files["vocab.txt"] = "".join(f"{t}\n" for t in ordered)
    if "vocab.json" in names:
        files["vocab.json"] = json.dumps(model["vocab"], ensure_ascii=False)
    if "merges.txt" in names:
        pairs = _merge_pairs(model.get("merges", []))
        files["merges.txt"] = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs)
    return files
