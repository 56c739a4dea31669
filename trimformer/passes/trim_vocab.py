"""Vocabulary trimming: the embedding rows of the tokens a domain corpus uses, and a self-check.

The tokenizer side (what is kept, the rewritten ``tokenizer.json``) is
:mod:`trimformer.data.vocabulary`; this pass gathers the word-embedding rows of the kept ids in
the new order, so id ``new`` reads the row the original id read. It then checks itself, on
onnxruntime: the corpus's texts must tokenize to the remapped ids, one to one, and give the same
outputs from both graphs; held-out texts report the share whose tokenization changed and how
often the two graphs agree.

Encoders only, before quantization: a quantized table (``GatherBlockQuantized``,
``QEmbedLayerNormalization``) is refused, and so is a table read by anything but a lookup (a tied
output projection, as a causal LM's lm_head, would change the model's output size).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassError
from pydantic import Field

from trimformer.data.vocabulary import (
    MIN_COVERAGE,
    VocabularyPlan,
    VocabularyTexts,
    encode_whole,
    plan_vocabulary,
    trimmed_tokenizer_json,
)
from trimformer.errors import UserError
from trimformer.passes.base import PassConfig, PassContext, PassReport, register_pass
from trimformer.runtime.encoding import TextEncoder
from trimformer.runtime.session import cpu_session

__all__ = ["TrimVocabConfig", "TrimVocabPass", "find_word_table", "gather_rows"]

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# Graph ops that store a quantized word table: trimming must come before quantization.
_QUANTIZED_TABLES = {"GatherBlockQuantized", "QEmbedLayerNormalization"}
# (op, input index of the word table) of the lookups a table may feed.
_LOOKUPS = {("Gather", 0), ("EmbedLayerNormalization", 2)}
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Flatten"}
TOKEN_IDS = "input_ids"
_CHECK_BATCH = 32
# Gathering rows moves no arithmetic: the outputs must be the same numbers (summation order aside).
_SAME_OUTPUTS = 1e-5


class TrimVocabConfig(PassConfig):
    coverage: float = Field(
        default=1.0,
        ge=MIN_COVERAGE,
        le=1.0,
        description=f"in [{MIN_COVERAGE}, 1]: the share of the corpus's token occurrences kept "
        "(1: every token the corpus uses, so the corpus tokenizes as before)",
    )
    check_texts: int = Field(
        default=512, ge=1, description="1 or more: corpus and held-out texts run through both graphs"
    )


def _reads_token_ids(node: ir.Node, index: int) -> bool:
    """The lookup's index input is the graph's ``input_ids`` (through casts and reshapes)."""
    value = node.inputs[1 if node.op_type == "Gather" else 0]
    while value is not None and value.producer() is not None:
        producer = value.producer()
        assert producer is not None
        if producer.op_type not in _PASS_THROUGH:
            return False
        value = producer.inputs[0]
    return value is not None and value.name == TOKEN_IDS


def find_word_table(graph: ir.Graph) -> ir.Value:
    """The one initializer a lookup reads with the graph's token ids."""
    quantized = sorted({n.op_type for n in graph if n.op_type in _QUANTIZED_TABLES})
    if quantized:
        raise UserError(
            f"the graph's word table is already quantized ({', '.join(quantized)}); trim the "
            "vocabulary before quantizing (trim-vocab, then quantize)"
        )
    found: list[ir.Value] = []
    for value in graph.initializers.values():
        uses = [(node, index) for node, index in value.uses()]
        if not any((n.op_type, i) in _LOOKUPS and _reads_token_ids(n, i) for n, i in uses):
            continue
        others = sorted({n.op_type for n, i in uses if (n.op_type, i) not in _LOOKUPS})
        if others:
            raise UserError(
                f"the word table {value.name} is also read by {', '.join(others)}, not only by a lookup "
                "(a tied output layer): trim-vocab supports encoders only"
            )
        found.append(value)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(str(v.name) for v in found)})"
        raise UserError(
            f"found {what} word-embedding tables read by a Gather or EmbedLayerNormalization of "
            f"{TOKEN_IDS}; trim-vocab needs exactly one"
        )
    return found[0]


def gather_rows(table: ir.Value, kept: Sequence[int]) -> tuple[int, int]:
    """Keep ``kept``'s rows, in that order; returns the table's bytes before and after."""
    assert table.const_value is not None
    array = table.const_value.numpy()
    if array.shape[0] <= max(kept):
        raise UserError(
            f"the word table {table.name} has {array.shape[0]} rows and the tokenizer ids up to {max(kept)}: "
            "they do not belong together"
        )
    trimmed = np.ascontiguousarray(array[np.asarray(kept, dtype=np.int64)])
    table.const_value = ir.tensor(trimmed, name=table.name)
    table.shape = ir.Shape(trimmed.shape)
    return int(array.nbytes), int(trimmed.nbytes)


def _run(model: onnx.ModelProto, encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
    """The first output for every text, rows in order (batches padded to their longest row)."""
    session = cpu_session(model)
    outputs = []
    for start in range(0, len(texts), _CHECK_BATCH):
        feeds = encoder(texts[start : start + _CHECK_BATCH])
        outputs.append(np.asarray(session.run(None, feeds)[0], dtype=np.float64))
    return np.concatenate([o.reshape(o.shape[0], -1) for o in outputs])


def _agreement(before: np.ndarray, after: np.ndarray, classifier: bool) -> dict[str, float]:
    if classifier:
        return {"label_agreement": float(np.mean(before.argmax(-1) == after.argmax(-1)))}
    cosine = np.sum(before * after, -1) / (np.linalg.norm(before, axis=-1) * np.linalg.norm(after, axis=-1))
    return {"mean_cosine": float(np.mean(cosine)), "min_cosine": float(np.min(cosine))}


def _sample(texts: Sequence[str], count: int) -> list[str]:
    """``count`` texts spread over the whole list (the head of a file is often one kind)."""
    if len(texts) <= count:
        return list(texts)
    return [texts[int(i)] for i in np.linspace(0, len(texts) - 1, count)]


class TrimVocabPass(FunctionalPass):
    """Gather the kept rows and check the trimmed graph with the trimmed tokenizer."""

    def __init__(self, config: TrimVocabConfig, ctx: PassContext) -> None:
        super().__init__()
        if ctx.vocabulary is None:
            raise UserError("the trim-vocab pass needs a corpus; pass --corpus DATA")
        self.config = config
        self.texts: VocabularyTexts = ctx.vocabulary
        self.scratch = ctx.scratch

    def call(self, model: ir.Model) -> PassReport:
        texts = self.texts
        plan = plan_vocabulary(
            texts.tokenizer_json, texts.corpus, self.config.coverage, keep=texts.keep_ids()
        )
        before = ir.to_proto(model)
        trimmed = ir.from_proto(before)
        table = find_word_table(trimmed.graph)
        bytes_before, bytes_after = gather_rows(table, plan.kept)
        new_json = trimmed_tokenizer_json(texts.tokenizer_json, plan)
        after = ir.to_proto(trimmed)
        names = [i.name for i in before.graph.input]
        new_pad = plan.old_to_new()[texts.pad_token_id]
        assert new_pad == texts.pad_token_id, "every id up to the padding id is kept"
        old_encoder = TextEncoder(texts.tokenizer_json, names, texts.max_length, texts.pad_token_id)
        new_encoder = TextEncoder(new_json, names, texts.max_length, new_pad)
        stats = self._stats(plan, str(table.name), bytes_before, bytes_after, new_json)
        stats["corpus_check"] = self._check_corpus(
            plan, new_json, (before, after), (old_encoder, new_encoder)
        )
        if texts.holdout:
            stats["holdout"] = self._check_holdout(new_json, (before, after), (old_encoder, new_encoder))
        path = self.scratch / f"trim-vocab-{id(self)}-{TOKENIZER_FILE}"
        path.write_text(new_json, encoding="utf-8")
        return PassReport(trimmed, modified=True, stats=stats, files={TOKENIZER_FILE: path})

    def _stats(
        self, plan: VocabularyPlan, table: str, before: int, after: int, new_json: str
    ) -> dict[str, Any]:
        return {
            "family": plan.family,
            "vocab_before": plan.vocab_before,
            "vocab_after": plan.vocab_after,
            "kept_for_fallback": plan.kept_for_fallback,
            "coverage": round(plan.coverage, 6),
            "corpus_texts": plan.corpus_texts,
            "corpus_tokens": plan.corpus_tokens,
            "table": table,
            "table_bytes_before": before,
            "table_bytes_after": after,
            "tokenizer_bytes_before": len(self.texts.tokenizer_json.encode()),
            "tokenizer_bytes_after": len(new_json.encode()),
        }

    def _check_corpus(
        self,
        plan: VocabularyPlan,
        new_json: str,
        models: tuple[onnx.ModelProto, onnx.ModelProto],
        encoders: tuple[TextEncoder, TextEncoder],
    ) -> dict[str, Any]:
        """Every corpus text's ids map one to one (all of them: tokenizing is cheap), and the
        graphs give the same outputs on a spread sample of those whose tokens were all kept."""
        remap = plan.old_to_new()
        corpus = self.texts.corpus
        old_ids = encode_whole(self.texts.tokenizer_json, corpus)
        new_ids = encode_whole(new_json, corpus)
        unchanged = [
            text
            for text, old, new in zip(corpus, old_ids, new_ids, strict=True)
            if [remap.get(i, -1) for i, _ in old] == [i for i, _ in new]
        ]
        changed = len(self.texts.corpus) - len(unchanged)
        if changed and plan.coverage >= 1.0:
            raise PassError(
                f"trim-vocab: {changed} corpus texts tokenize differently after trimming although every token "
                "they use was kept; please report this with the tokenizer.json"
            )
        sample = _sample(unchanged, self.config.check_texts)
        before = _run(models[0], encoders[0], sample)
        after = _run(models[1], encoders[1], sample)
        diff = float(np.max(np.abs(before - after))) if sample else 0.0
        if diff > _SAME_OUTPUTS:
            raise PassError(
                f"trim-vocab: the trimmed graph's outputs differ from the original's by {diff:.3g} on corpus "
                "texts that tokenize the same; please report this"
            )
        return {"texts_changed": changed, "texts_compared": len(sample), "max_abs_diff": diff}

    def _check_holdout(
        self,
        new_json: str,
        models: tuple[onnx.ModelProto, onnx.ModelProto],
        encoders: tuple[TextEncoder, TextEncoder],
    ) -> dict[str, Any]:
        """How other texts of the domain fare: tokenization changed, outputs agreeing."""
        holdout = list(self.texts.holdout)
        old = encode_whole(self.texts.tokenizer_json, holdout)
        new = encode_whole(new_json, holdout)
        changed = sum([t for _, t in a] != [t for _, t in b] for a, b in zip(old, new, strict=True))
        sample = _sample(holdout, self.config.check_texts)
        before = _run(models[0], encoders[0], sample)
        after = _run(models[1], encoders[1], sample)
        return {
            "texts": len(holdout),
            "tokenization_changed": round(changed / len(holdout), 6),
            "texts_compared": len(sample),
            **_agreement(before, after, self.texts.classifier),
        }


# After pruning (it reads the float table), beside fusion (EmbedLayerNormalization reads the same
# table), before quantization (a quantized table is refused). Activations are unchanged, so QAT
# ranges stay valid: it does not count as changing weights.
@register_pass("trim-vocab", TrimVocabConfig, order=1, data=("corpus",))
def _trim_vocab(config: TrimVocabConfig, ctx: PassContext) -> TrimVocabPass:
    return TrimVocabPass(config, ctx)
