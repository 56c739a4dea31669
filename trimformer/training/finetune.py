"""Fine-tuning a Transformer on a labelled dataset: the teacher that the later stages shrink.

AdamW with linear warm-up and decay, steps or epochs, evaluation on a dev split every N steps
keeping the best weights, deterministic under a seed. Writes a Hugging Face folder (or a plain
model folder) that `trimformer export` and `trimformer distill` take.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trimformer import __version__
from trimformer.data import Encoder, TextDataset, load_dataset, map_labels
from trimformer.data.tokenizer import TOKENIZER_FILES
from trimformer.errors import UserError
from trimformer.fsutil import atomic_output_dir, check_output_dir
from trimformer.progress import progress_bar
from trimformer.sources import LoadedSource, load_source

__all__ = ["TRAIN_RECORD", "TrainConfig", "TrainResult", "evaluate_accuracy", "forward_logits", "train"]

logger = logging.getLogger(__name__)

TRAIN_RECORD = "trimformer_train.json"


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    steps: int | None = 500
    epochs: float | None = None
    batch_size: int = 32
    max_length: int = 64
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 100
    eval_limit: int | None = 2000
    seed: int = 0
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 8 <= self.max_length <= 512:
            raise UserError(f"--max-length must be between 8 and 512, got {self.max_length}")
        if not 0 < self.lr < 1:
            raise UserError(f"--lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"--warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.eval_every < 1:
            raise UserError(f"--eval-every must be at least 1, got {self.eval_every}")


@dataclass
class TrainResult:
    out: str
    labels: list[str]
    steps: int
    best_step: int
    best_dev_accuracy: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def forward_logits(source: LoadedSource, feeds: dict[str, np.ndarray]) -> torch.Tensor:
    """Run a loaded source's graph signature on numpy feeds."""
    out = source.module(*(torch.from_numpy(feeds[name]) for name in source.io.input_names))
    return out if isinstance(out, torch.Tensor) else out[0]


def evaluate_accuracy(
    source: LoadedSource, encoder: Encoder, dataset: TextDataset, targets: np.ndarray, batch_size: int = 128
) -> float:
    was_training = source.model.training
    source.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            stop = start + batch_size
            pairs = None if dataset.pairs is None else dataset.pairs[start:stop]
            logits = forward_logits(source, encoder(dataset.texts[start:stop], pairs))
            correct += int((logits.argmax(-1).numpy() == targets[start:stop]).sum())
    if was_training:
        source.model.train()
    return correct / max(len(dataset), 1)


def _labels_for(train_set: TextDataset) -> list[str]:
    assert train_set.labels is not None
    if train_set.label_names:
        return list(train_set.label_names)
    values = sorted(set(train_set.labels))
    if all(v.lstrip("-").isdigit() for v in values):
        return [str(v) for v in sorted(int(v) for v in values)]
    return values


def _schedule(total: int, warmup: float) -> Any:
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _save(source: LoadedSource, state: dict[str, torch.Tensor], labels: list[str], folder: Path) -> None:
    source.model.load_state_dict(state)
    if source.kind == "plain":
        source.model.save(folder)  # type: ignore[operator]
        source.tokenizer.save(str(folder / "tokenizer.json"))
        return
    config: Any = source.model.config
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    source.model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
    for name in TOKENIZER_FILES:
        if (source.folder / name).is_file():
            shutil.copy2(source.folder / name, folder / name)
    if not (folder / "tokenizer.json").exists():
        source.tokenizer.save(str(folder / "tokenizer.json"))


def train(config: TrainConfig) -> TrainResult:
    config.validate()
    check_output_dir(Path(config.out), config.overwrite)
    started = time.perf_counter()
    columns: dict[str, Any] = {
        "text_column": config.text_column,
        "text_pair_column": config.text_pair_column,
        "label_column": config.label_column,
    }
    train_set = load_dataset(config.data, split="train", seed=config.seed, **columns)
    dev_set = load_dataset(config.data, split="dev", seed=config.seed, limit=config.eval_limit, **columns)
    if train_set.labels is None:
        raise UserError(
            f"dataset {train_set.name} has no labels; training needs a label column (--label-column)"
        )
    labels = _labels_for(train_set)
    if len(labels) < 2:
        raise UserError(
            f"dataset {train_set.name} has only one label ({labels[0]}); training needs at least two"
        )
    source = load_source(config.model, task="sequence-classification", num_labels=len(labels))
    if source.kind == "plain" and source.labels != labels:
        raise UserError(f"the plain model's labels {source.labels} differ from the data's {labels}")
    train_y = map_labels(train_set.labels, labels)
    dev_y = map_labels(dev_set.labels or [], labels) if dev_set.labels else np.zeros(0, dtype=np.int64)
    max_length = min(config.max_length, source.max_length)
    encoder = Encoder(source.tokenizer, source.io.input_names, max_length, source.pad_token_id)

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = config.steps if config.epochs is None else max(1, int(config.epochs * steps_per_epoch))
    assert total is not None
    model = source.model
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup))
    loss_fn = torch.nn.CrossEntropyLoss()

    order = rng.permutation(len(train_set))
    cursor = 0
    best_acc, best_step = -1.0, 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    running = 0.0
    with progress_bar("train", total) as bar:
        task_id = bar.task_ids[0]
        for step in range(1, total + 1):
            if cursor + config.batch_size > len(order):
                order, cursor = rng.permutation(len(train_set)), 0
            idx = order[cursor : cursor + config.batch_size]
            cursor += config.batch_size
            texts = [train_set.texts[i] for i in idx]
            pairs = None if train_set.pairs is None else [train_set.pairs[i] for i in idx]
            logits = forward_logits(source, encoder(texts, pairs))
            loss = loss_fn(logits, torch.from_numpy(train_y[idx]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running = loss.item() if step == 1 else 0.95 * running + 0.05 * loss.item()
            info = f"loss {running:.3f}" + (f"  dev acc {best_acc:.4f}" if best_acc >= 0 else "")
            if len(dev_set) and (step % config.eval_every == 0 or step == total):
                acc = evaluate_accuracy(source, encoder, dev_set, dev_y)
                history.append({"step": step, "loss": round(running, 4), "dev_accuracy": round(acc, 4)})
                logger.info("step %d: loss %.4f dev accuracy %.4f", step, running, acc)
                if acc > best_acc:
                    best_acc, best_step = acc, step
                    best_state = copy.deepcopy(model.state_dict())
                info = f"loss {running:.3f}  dev acc {acc:.4f} (best {best_acc:.4f})"
            bar.update(task_id, advance=1, info=info)
    if best_state is None:
        best_state, best_step = copy.deepcopy(model.state_dict()), total
    model.eval()
    result = TrainResult(
        out=str(config.out),
        labels=labels,
        steps=total,
        best_step=best_step,
        best_dev_accuracy=round(best_acc, 4),
        seconds=round(time.perf_counter() - started, 1),
        history=history,
    )
    with atomic_output_dir(Path(config.out), overwrite=config.overwrite) as tmp:
        _save(source, best_state, labels, tmp)
        record = {
            "trimformer": __version__,
            "base_model_hash": source.files_hash,
            "data": Path(config.data).name if not config.data.startswith("builtin:") else config.data,
            "params": {
                k: v for k, v in asdict(config).items() if k not in ("out", "overwrite", "model", "data")
            },
            "result": {k: v for k, v in result.to_dict().items() if k != "out"},
        }
        (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return result
