"""``trimformer trim-vocab``: keep the vocabulary a domain corpus uses, gather the embedding rows."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import model_argument, overwrite_option, target_option


@click.command("trim-vocab")
@model_argument(help="Encoder artifact folder to trim (before quantize).")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option(
    "--corpus",
    required=True,
    help="The domain's texts: a .csv/.tsv/.jsonl file (read whole) or builtin:tweets (its train split).",
)
@click.option(
    "--holdout",
    default=None,
    help="Other texts of the domain to report on (tokenization changed, outputs agreeing) "
    "[default: a built-in corpus's test split; none for a file].",
)
@click.option(
    "--coverage",
    type=float,
    default=1.0,
    show_default=True,
    help="Share of the corpus's token occurrences to keep, most frequent first (at least 0.95); "
    "1 keeps every token the corpus uses, so it tokenizes exactly as before.",
)
@click.option(
    "--check-texts",
    type=int,
    default=512,
    show_default=True,
    help="Corpus and held-out texts run through both graphs by the self-check.",
)
@click.option("--text-column", default=None, help="Column holding the text [default: text].")
@click.option("--text-pair-column", default=None, help="Second text column, for sentence pairs.")
@target_option
@overwrite_option
@pass_state
def trim_vocab_command(
    state: State,
    model: str,
    out: str,
    corpus: str,
    holdout: str | None,
    coverage: float,
    check_texts: int,
    text_column: str | None,
    text_pair_column: str | None,
    target: str,
    overwrite: bool,
) -> None:
    """Keep the tokens CORPUS uses (plus special tokens and the alphabet), remap the tokenizer's ids
    and gather MODEL's word-embedding rows; checked on onnxruntime before it is written.

    \b
    The corpus tokenizes to the same tokens with new ids and the graph gives the same outputs;
    held-out texts report how many tokenize differently and how often the outputs agree.
    WordPiece (BERT family) and byte-level BPE (GPT-2, RoBERTa) tokenizers.

    \b
    Examples:
      trimformer trim-vocab work/teacher-onnx --corpus builtin:tweets --out work/teacher-trimmed
      trimformer trim-vocab work/model --corpus domain.jsonl --holdout heldout.jsonl --out work/trimmed
    """
    from trimformer.passes.trim_vocab import TrimVocabConfig
    from trimformer.pipeline.stages.trim_vocab import run_trim_vocab

    config = TrimVocabConfig(coverage=coverage, check_texts=check_texts)
    result = run_trim_vocab(
        model,
        out,
        corpus,
        config,
        holdout=holdout,
        text_column=text_column,
        text_pair_column=text_pair_column,
        overwrite=overwrite,
        target=target,
    )
    emit(state, result, summary(result))


def summary(result: dict) -> str:
    saved = (result["table_bytes_before"] - result["table_bytes_after"]) / 1e6
    check = result["corpus_check"]
    text = (
        f"vocabulary {result['vocab_before']} -> {result['vocab_after']} tokens "
        f"({result['coverage']:.2%} of the corpus's {result['corpus_tokens']} tokens), word table "
        f"-{saved:.1f} MB, model {result['input_size_mb']:.1f} -> {result['size_mb']:.1f} MB; corpus: "
        f"{check['texts_compared']} texts compared, max abs diff {check['max_abs_diff']:.1e}"
    )
    held = result.get("holdout")
    if held is not None:
        agreement = (
            f"label agreement {held['label_agreement']:.2%}"
            if "label_agreement" in held
            else f"mean cosine {held['mean_cosine']:.4f}"
        )
        text += f"; held-out: {held['tokenization_changed']:.1%} tokenize differently, {agreement}"
    return f"{text}; wrote {result['out']}"
