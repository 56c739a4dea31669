"""The trim-vocab stage: an encoder artifact and a domain corpus in, the trimmed artifact out.

Reads the corpus (and held-out texts) before anything runs, hands them to the pass with the
artifact's tokenizer, and writes what the pass changed beside the model: ``tokenizer.json``, the
slow-tokenizer files the folder had (vocab.txt, vocab.json, merges.txt) and ``config.json``'s
vocabulary size and special-token ids, so Hugging Face loaders agree with the trimmed graph.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from trimformer.artifact import ModelArtifact
from trimformer.data import TextDataset, load_dataset
from trimformer.data.tokenizer import load_tokenizer
from trimformer.data.vocabulary import VocabularyTexts, trimmed_vocab_files
from trimformer.errors import UserError
from trimformer.formats.targets import AUTO_TARGET
from trimformer.fsutil import check_output_dir
from trimformer.passes.base import PassContext, PassReport, apply_pass, check_model_kind, get_pass
from trimformer.passes.trim_vocab import TOKENIZER_FILE, TrimVocabConfig
from trimformer.pipeline.context import host_target, is_classifier
from trimformer.pipeline.stages.params import calibration_split

__all__ = ["HOLDOUT_SPLIT", "corpus_texts", "declared_special_tokens", "run_trim_vocab"]

# A built-in set is trimmed on its train split and checked on its test split (as validate scores it).
HOLDOUT_SPLIT = "test"
_CONFIG_FILE = "config.json"
_SPECIAL_FILES = ("special_tokens_map.json", "tokenizer_config.json")


def corpus_texts(dataset: TextDataset) -> list[str]:
    """Every text of a dataset, second texts of pairs included (both reach the tokenizer)."""
    texts = [t for t in dataset.texts if t]
    if dataset.pairs is not None:
        texts += [t for t in dataset.pairs if t]
    if not texts:
        raise UserError(f"the corpus {dataset.name} has no texts; trim-vocab keeps the tokens a corpus uses")
    return texts


def _read_texts(
    corpus: str, holdout: str | None, text_column: str | None, text_pair_column: str | None
) -> tuple[list[str], list[str]]:
    def read(spec: str, split: str) -> list[str]:
        dataset = load_dataset(spec, text_column=text_column, text_pair_column=text_pair_column, split=split)
        return corpus_texts(dataset)

    texts = read(corpus, calibration_split(corpus))
    if holdout is None and corpus.startswith("builtin:"):
        holdout = corpus
    if holdout is None:
        return texts, []
    return texts, read(holdout, HOLDOUT_SPLIT if holdout.startswith("builtin:") else "all")


def declared_special_tokens(folder: Path) -> tuple[str, ...]:
    """The special tokens a Hugging Face folder declares (``*_token`` keys and
    ``additional_special_tokens`` of special_tokens_map.json and tokenizer_config.json)."""
    tokens: list[str] = []
    for name in _SPECIAL_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not valid JSON ({exc}); fix or remove it") from exc
        values = [v for k, v in spec.items() if k.endswith("_token")]
        values += spec.get("additional_special_tokens") or []
        for value in values:
            content = value.get("content") if isinstance(value, dict) else value
            if isinstance(content, str) and content not in tokens:
                tokens.append(content)
    return tuple(tokens)


def _rewrite_config(folder: Path, old_json: str, new_json: str) -> None:
    """config.json's vocabulary size and special-token ids, for loaders that read them."""
    path = folder / _CONFIG_FILE
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    old, new = Tokenizer.from_str(old_json), Tokenizer.from_str(new_json)
    config["vocab_size"] = new.get_vocab_size(with_added_tokens=True)
    for key, value in list(config.items()):
        if key.endswith("_token_id") and isinstance(value, int):
            token = old.id_to_token(value)
            config[key] = new.token_to_id(token) if token is not None else None
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_tokenizer(folder: Path, report: PassReport, old_json: str) -> None:
    shutil.copy2(report.files[TOKENIZER_FILE], folder / TOKENIZER_FILE)
    new_json = (folder / TOKENIZER_FILE).read_text(encoding="utf-8")
    present = [p.name for p in folder.iterdir()]
    for name, text in trimmed_vocab_files(new_json, present).items():
        (folder / name).write_text(text, encoding="utf-8")
    _rewrite_config(folder, old_json, new_json)


def run_trim_vocab(
    model: str | Path,
    out: str | Path,
    corpus: str,
    config: TrimVocabConfig,
    *,
    holdout: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    overwrite: bool = False,
    target: str = AUTO_TARGET,
) -> dict[str, Any]:
    """Trim ``model``'s vocabulary to ``corpus`` (its train split for a built-in set; held-out
    texts: ``holdout``, else a built-in corpus's test split) and write the artifact to ``out``."""
    out = Path(out)
    check_output_dir(out, overwrite)
    artifact = ModelArtifact.open(model)
    check_model_kind(get_pass("trim-vocab"), artifact)
    tokenizer_path = artifact.path / artifact.meta.tokenizer.file
    if not tokenizer_path.is_file():
        raise UserError(f"{artifact.path} has no {artifact.meta.tokenizer.file}; export the model again")
    # The project's one reader refuses a malformed file in one line before anything else runs.
    tokenizer_json = load_tokenizer(artifact.path).to_str()
    texts, held = _read_texts(corpus, holdout, text_column, text_pair_column)
    vocabulary = VocabularyTexts(
        tokenizer_json=tokenizer_json,
        max_length=artifact.meta.tokenizer.max_length,
        pad_token_id=artifact.meta.tokenizer.pad_token_id,
        corpus=texts,
        holdout=held,
        classifier=is_classifier(artifact),
        special_tokens=declared_special_tokens(artifact.path),
    )
    with tempfile.TemporaryDirectory(prefix="trimformer-trim-vocab-") as scratch:
        ctx = PassContext(scratch=Path(scratch), target=host_target(target), vocabulary=vocabulary)
        result, report = apply_pass(
            artifact,
            "trim-vocab",
            config,
            ctx,
            out,
            overwrite=overwrite,
            extra_params={"corpus": corpus, "holdout": holdout},
            on_written=lambda folder, rep: _write_tokenizer(folder, rep, tokenizer_json),
        )
    return {
        "out": str(out),
        "size_mb": round(result.size_bytes() / 1e6, 3),
        "input_size_mb": round(artifact.size_bytes() / 1e6, 3),
        **report.stats,
    }
