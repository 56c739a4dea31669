"""Tiny models, tokenizers and datasets built in code, so tests run in seconds and download nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from trimformer.sources import PlainConfig, PlainTransformerClassifier

LABELS = ["negative", "neutral", "positive"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "love", "happy", "excellent", "nice", "best", "wonderful"]
NEGATIVE = ["bad", "awful", "hate", "sad", "terrible", "worst", "poor", "broken"]
NEUTRAL = ["the", "a", "car", "phone", "apple", "today", "is", "was", "it", "this", "my", "new", "store"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL + list("abcdefghijklmnopqrstuvwxyz")


def make_tokenizer() -> Tokenizer:
    vocab = {
        tok: i for i, tok in enumerate(SPECIALS + WORDS + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"])
    }
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def vocab_size() -> int:
    # Ids have gaps ("a" is both a word and a letter), so size the embedding by the largest id.
    return max(make_tokenizer().get_vocab().values()) + 1


def _hf_config(model_type: str, task: str, layers: int, hidden: int, heads: int, ffn: int) -> object:
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    common = {"vocab_size": vocab_size() + 2, "pad_token_id": 0}
    label_kwargs = {}
    if task == "sequence-classification":
        label_kwargs = {
            "id2label": dict(enumerate(LABELS)),
            "label2id": {name: i for i, name in enumerate(LABELS)},
        }
    if model_type == "bert":
        return BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=128,
            **common,
            **label_kwargs,
        )
    if model_type == "distilbert":
        return DistilBertConfig(
            dim=hidden,
            n_layers=layers,
            n_heads=heads,
            hidden_dim=ffn,
            max_position_embeddings=128,
            **common,
            **label_kwargs,
        )
    if model_type == "roberta":
        return RobertaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=130,
            type_vocab_size=1,
            **common,
            **label_kwargs,
        )
    raise ValueError(model_type)


def make_hf_model(
    folder: Path,
    model_type: str = "bert",
    task: str = "sequence-classification",
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    ffn: int = 64,
    seed: int = 0,
    pooling: str | None = None,
    safetensors: bool = True,
) -> Path:
    """Save a randomly initialised Hugging Face model with a tokenizer into ``folder``."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = _hf_config(model_type, task, layers, hidden, heads, ffn)
    if task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModel.from_config(config)
    model.save_pretrained(str(folder), safe_serialization=safetensors)
    make_tokenizer().save(str(folder / "tokenizer.json"))
    if pooling is not None:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": hidden, f"pooling_mode_{pooling}": True})
        )
        (folder / "modules.json").write_text(
            json.dumps(
                [
                    {
                        "idx": 2,
                        "name": "2",
                        "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize",
                    }
                ]
            )
        )
    return folder


def make_plain_model(
    folder: Path, layers: int = 2, hidden: int = 32, heads: int = 4, ffn: int = 64, seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    config = PlainConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden,
        num_heads=heads,
        num_layers=layers,
        ffn_size=ffn,
        max_length=128,
        labels=list(LABELS),
    )
    model = PlainTransformerClassifier(config)
    model.save(folder)
    make_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def sentence(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(LABELS)
    pool = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 8))] + [rng.choice(pool) for _ in range(2)]
    rng.shuffle(words)
    return " ".join(words), label


def make_csv(path: Path, rows: int = 120, seed: int = 0, delimiter: str = ",") -> Path:
    rng = random.Random(seed)
    lines = [f"text{delimiter}label"]
    for _ in range(rows):
        text, label = sentence(rng)
        lines.append(f"{text}{delimiter}{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_jsonl(path: Path, rows: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            text, label = sentence(rng)
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return path
