"""Training a causal language model on a text corpus: the built-in decoder example.

No model hub is reachable here, so the decoder examples are trained: a byte-level BPE tokenizer
(``tokenizers``) learned on the train split, then a small Llama-layout model with grouped-query
attention (fewer KV heads than query heads) trained from scratch on the same split, or a given
causal-LM folder trained further with its own tokenizer. Texts are framed ``<s> text </s>`` and
packed into blocks of ``max_length`` tokens. The dev split scores each evaluation (mean token
negative log-likelihood, best weights kept); the test split is never read here.

The run checkpoints every ``save_every`` steps (and when interrupted) next to the output folder,
and a rerun with the same settings continues from there. The output is a Hugging Face folder
(``model.safetensors``, ``config.json``, ``generation_config.json``, ``tokenizer.json`` and
``tokenizer_config.json`` with bos/eos/pad, loadable by ``transformers.AutoTokenizer``) with a
training record (``trimformer_train.json``) that states the dev perplexity next to that of a
unigram model of the same tokens.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from trimformer import __version__
from trimformer.data import load_dataset
from trimformer.data.tokenizer import TOKENIZER_FILES
from trimformer.errors import UserError
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.fsutil import atomic_output_dir, check_output_dir, sha256_bytes
from trimformer.sources import load_source
from trimformer.training.finetune import TRAIN_RECORD
from trimformer.training.loop import Evaluation, LoopState, StepFn, TrainingLoop
from trimformer.training.options import loop_settings, refuse_failed, schedule_checks

__all__ = ["LMConfig", "LMResult", "LMShape", "train_causal_lm", "train_tokenizer"]

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class LMShape:
    """The built-in model: about 3.9 M parameters with a 4096-token vocabulary."""

    hidden_size: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    ffn_size: int = 704
    context_length: int = 1024


@dataclass
class LMConfig:
    data: str
    out: str
    model: str | None = None  # None: a new Llama-layout model and tokenizer
    steps: int = 700
    batch_size: int = 16
    max_length: int = 128  # tokens per packed training block
    lr: float = 1e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    eval_every: int = 100
    eval_blocks: int = 64
    vocab_size: int = 4096
    shape: LMShape = field(default_factory=LMShape)
    seed: int = 0
    text_column: str | None = None
    save_every: int = 100
    overwrite: bool = False
    # Where the resumable checkpoint lives; None: `.<out>.checkpoint` beside ``out`` (a recipe
    # stage writes into a temporary folder, so it names one that survives a killed run).
    checkpoint_dir: str | None = None

    def validate(self) -> None:
        refuse_failed(
            [
                *schedule_checks(self),  # type: ignore[arg-type]
                (256 <= self.vocab_size <= 65536, f"--vocab-size must be in [256, 65536], got {self.vocab_size}"),
                (self.eval_blocks >= 1, f"eval blocks must be at least 1, got {self.eval_blocks}"),
                (self.save_every >= 1, f"--save-every must be at least 1, got {self.save_every}"),
            ]
        )  # fmt: skip

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be continued."""
        ignored = ("out", "overwrite", "save_every", "checkpoint_dir")
        keep = {k: v for k, v in asdict(self).items() if k not in ignored}
        return sha256_bytes(json.dumps(keep, sort_keys=True, default=str).encode())


@dataclass
class LMResult:
    out: str
    steps: int
    best_step: int
    dev_perplexity: float
    unigram_dev_perplexity: float
    parameters: int
    vocab_size: int
    train_tokens: int
    resumed_from: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer whose encodings start with ``<s>`` (as Llama's do)."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _new_model(tokenizer: Tokenizer, shape: LMShape) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context_length,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.token_to_id(BOS),
        eos_token_id=tokenizer.token_to_id(EOS),
        pad_token_id=tokenizer.token_to_id(PAD),
    )
    return LlamaForCausalLM(config)


def _pack(tokenizer: Tokenizer, texts: list[str], eos_id: int, block: int) -> np.ndarray:
    """``<s> text </s>`` for every text, concatenated and cut into rows of ``block`` tokens."""
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        stream.extend(encoding.ids)
        stream.append(eos_id)
    rows = len(stream) // block
    if rows < 1:
        raise UserError(
            f"the corpus has {len(stream)} tokens, fewer than one block of {block}; lower --max-length"
        )
    return np.asarray(stream[: rows * block], dtype=np.int64).reshape(rows, block)


def unigram_perplexity(train: np.ndarray, dev: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``dev`` of token frequencies counted on ``train`` (add-one smoothing)."""
    counts = np.bincount(train.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(np.exp(-log_probs[dev.ravel()].mean()))


@dataclass
class _Corpus:
    tokenizer: Tokenizer
    train: np.ndarray
    dev: np.ndarray
    unigram: float


def _corpus(config: LMConfig, tokenizer: Tokenizer | None) -> _Corpus:
    train_set = load_dataset(config.data, split="train", seed=config.seed, text_column=config.text_column)
    dev_set = load_dataset(config.data, split="dev", seed=config.seed, text_column=config.text_column)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_set.texts, config.vocab_size)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise UserError(f"the tokenizer has no {EOS} token to end each text with")
    train = _pack(tokenizer, train_set.texts, eos, config.max_length)
    dev = _pack(tokenizer, dev_set.texts, eos, config.max_length)[: config.eval_blocks]
    unigram = unigram_perplexity(train, dev, tokenizer.get_vocab_size())
    return _Corpus(tokenizer, train, dev, unigram)


def mean_nll(model: torch.nn.Module, blocks: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood over ``blocks`` (each a row of token ids)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(blocks[start : start + batch_size])
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def _steps(model: torch.nn.Module, train: np.ndarray, config: LMConfig) -> StepFn:
    """One batch of blocks a step, in a seeded order that depends only on the step (so a resumed
    run reads the same batches the interrupted one would have)."""

    def step(number: int) -> list[dict[str, float]]:
        epoch, offset = divmod((number - 1) * config.batch_size, len(train))
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train))
        rows = np.take(order, range(offset, offset + config.batch_size), mode="wrap")
        ids = torch.from_numpy(train[rows])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return [{"loss": loss.item()}]

    return step


class _Checkpoint:
    """The run's checkpoint: model, loop state and tokenizer, in a folder beside the output."""

    def __init__(self, config: LMConfig) -> None:
        out = Path(config.out)
        self.folder = (
            Path(config.checkpoint_dir) if config.checkpoint_dir else out.parent / f".{out.name}.checkpoint"
        )
        self.path = self.folder / CHECKPOINT_FILE
        self.fingerprint = config.fingerprint()

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            payload: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(
                f"checkpoint {self.path} cannot be read; delete {self.folder} to start over"
            ) from exc
        if payload.get("fingerprint") != self.fingerprint:
            logger.warning("ignoring checkpoint %s: it belongs to a run with other settings", self.folder)
            return None
        return payload

    def save(self, model: torch.nn.Module, loop: TrainingLoop, tokenizer: Tokenizer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": self.fingerprint, **loop.checkpoint()}
        payload.update(model=model.state_dict(), tokenizer=tokenizer.to_str(), rng=torch.get_rng_state())
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _save_tokenizer(tokenizer: Tokenizer, folder: Path, context_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=context_length,
    )
    fast.save_pretrained(str(folder))


def _write_output(
    config: LMConfig, model: Any, tokenizer: Tokenizer, source_folder: Path | None, result: LMResult
) -> None:
    with atomic_output_dir(Path(config.out), overwrite=config.overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if source_folder is None:
            _save_tokenizer(tokenizer, tmp, int(model.config.max_position_embeddings))
        else:
            for name in TOKENIZER_FILES:
                if (source_folder / name).is_file():
                    shutil.copy2(source_folder / name, tmp / name)
        record = {
            "trimformer": __version__,
            "task": CAUSAL_LM,
            "data": config.data if config.data.startswith("builtin:") else Path(config.data).name,
            "params": {k: v for k, v in asdict(config).items() if k not in ("out", "overwrite", "data")},
            "result": {k: v for k, v in result.to_dict().items() if k != "out"},
        }
        (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def train_causal_lm(config: LMConfig) -> LMResult:
    """Train (or continue training) a causal LM on ``config.data``; see the module docstring."""
    config.validate()
    check_output_dir(Path(config.out), config.overwrite)
    started = time.perf_counter()
    checkpoint = _Checkpoint(config)
    payload = checkpoint.load()
    source_folder = None
    tokenizer: Tokenizer | None
    if config.model is not None:
        source = load_source(config.model, task=CAUSAL_LM)
        model, tokenizer, source_folder = source.model, source.tokenizer, source.folder
    else:
        tokenizer = Tokenizer.from_str(payload["tokenizer"]) if payload else None
        model = None
    corpus = _corpus(config, tokenizer)
    torch.manual_seed(config.seed)
    model = model if model is not None else _new_model(corpus.tokenizer, config.shape)
    model.train()
    loop = TrainingLoop(model, loop_settings(config, config.steps), LoopState())  # type: ignore[arg-type]
    if payload is not None:
        model.load_state_dict(payload["model"])
        loop.restore(payload)
        torch.set_rng_state(payload["rng"])
        logger.info("resuming from step %d of %d (%s)", loop.state.step, config.steps, checkpoint.folder)
    resumed_from = loop.state.step
    evaluation = Evaluation(
        score=lambda: -mean_nll(model, corpus.dev),
        weights=model.state_dict,
        label="-nll",
        history_key="dev_neg_nll",
    )

    def after_step(step: int) -> None:
        if step % config.save_every == 0 and step < config.steps:
            checkpoint.save(model, loop, corpus.tokenizer)

    try:
        loop.run(_steps(model, corpus.train, config), evaluation, "train lm", after_step)
    except KeyboardInterrupt:
        checkpoint.save(model, loop, corpus.tokenizer)
        logger.warning("interrupted at step %d; rerun the same command to continue", loop.state.step)
        raise
    state = loop.state
    best = state.best_state if state.best_state is not None else copy.deepcopy(model.state_dict())
    model.load_state_dict(best)
    model.eval()
    result = LMResult(
        out=config.out,
        steps=config.steps,
        best_step=state.best_step or config.steps,
        dev_perplexity=round(math.exp(-state.best_score), 3),
        unigram_dev_perplexity=round(corpus.unigram, 3),
        parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=corpus.tokenizer.get_vocab_size(),
        train_tokens=int(corpus.train.size),
        resumed_from=resumed_from,
        seconds=round(time.perf_counter() - started, 1),
        history=state.history,
    )
    _write_output(config, model, corpus.tokenizer, source_folder, result)
    checkpoint.remove()
    return result
