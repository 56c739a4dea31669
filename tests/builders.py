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
    from transformers import BertConfig, DistilBertConfig, RobertaConfig, XLMRobertaConfig

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
    if model_type in ("roberta", "xlm-roberta"):
        return (RobertaConfig if model_type == "roberta" else XLMRobertaConfig)(
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


DECODER_SPECIALS = ["<pad>", "<s>", "</s>"]


def make_bpe_tokenizer(vocab: int = 320, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer with <pad>=0, <s>=1, </s>=2 whose encodings start with <s>."""
    from tokenizers import models, trainers

    rng = random.Random(seed)
    texts = [sentence(rng)[0] for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=DECODER_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _decoder_config(
    family: str, vocab: int, context: int, tied: bool = False, head_dim: int | None = None
) -> object:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": vocab}
    llama_like = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "max_position_embeddings": context,
        "tie_word_embeddings": tied,
        # Wider than the default 0.02, so random logits have clear winners: greedy parity must
        # not hinge on ties that float rounding decides.
        "initializer_range": 0.2,
        **ids,
        # 16: onnxruntime's attention kernel rotates and packs itself only for whole 16-float heads.
        **({"head_dim": head_dim} if head_dim else {}),
    }
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "mistral":
        return MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "qwen3":
        return Qwen3Config(**{"head_dim": 8, **llama_like})
    if family == "gpt2":
        return GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=context,
            initializer_range=0.2,
            tie_word_embeddings=tied,
            **ids,
        )
    raise ValueError(family)


def make_causal_lm(
    folder: Path,
    family: str = "llama",
    context: int = 128,
    seed: int = 0,
    tied: bool = False,
    head_dim: int | None = None,
) -> Path:
    """A tiny causal-LM folder of ``family`` with random weights, its BPE tokenizer and config;
    ``tied``: the lm_head shares the token table; ``head_dim``: wider heads than hidden / heads
    (Llama-like families)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = make_bpe_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        _decoder_config(family, tok.get_vocab_size(), context, tied, head_dim)
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=context
    )
    fast.save_pretrained(str(folder))
    return folder
