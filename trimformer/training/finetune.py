"""Fine-tuning a Transformer on a labelled dataset: the teacher that the later stages shrink.

One batch a step, steps or epochs, through the loop distillation uses too
(:mod:`trimformer.training.loop`: AdamW with linear warm-up and decay, evaluation on a dev split
every N steps keeping the best weights); deterministic under a seed. Writes a Hugging Face folder
(or a plain model folder) that `trimformer export` and `trimformer distill` take.
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
from trimformer.sources import LoadedSource, load_source
from trimformer.training.loop import Evaluation, LoopState, StepFn, TrainingLoop
from trimformer.training.options import data_columns, loop_settings, refuse_failed, schedule_checks

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
        common = schedule_checks(self)
        epochs = (self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        refuse_failed([common[0], epochs, *common[1:]])


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


@dataclass
class _Data:
    train: TextDataset
    dev: TextDataset
    labels: list[str]
    train_targets: np.ndarray
    dev_targets: np.ndarray


def _load_data(config: TrainConfig) -> _Data:
    columns = data_columns(config)
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
    dev_targets = map_labels(dev_set.labels, labels) if dev_set.labels else np.zeros(0, dtype=np.int64)
    return _Data(train_set, dev_set, labels, map_labels(train_set.labels, labels), dev_targets)


def _batches(source: LoadedSource, encoder: Encoder, data: _Data, config: TrainConfig) -> StepFn:
    """One batch a step: rows in a seeded random order, reshuffled once too few are left."""
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(data.train))
    cursor = 0
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(_: int) -> list[dict[str, float]]:
        nonlocal order, cursor
        if cursor + config.batch_size > len(order):
            order, cursor = rng.permutation(len(data.train)), 0
        idx = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        texts = [data.train.texts[i] for i in idx]
        pairs = None if data.train.pairs is None else [data.train.pairs[i] for i in idx]
        logits = forward_logits(source, encoder(texts, pairs))
        loss = loss_fn(logits, torch.from_numpy(data.train_targets[idx]))
        loss.backward()
        return [{"loss": loss.item()}]

    return step


def _write_output(
    config: TrainConfig, source: LoadedSource, best_state: dict[str, torch.Tensor], result: TrainResult
) -> None:
    with atomic_output_dir(Path(config.out), overwrite=config.overwrite) as tmp:
        _save(source, best_state, result.labels, tmp)
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


def train(config: TrainConfig) -> TrainResult:
    config.validate()
    check_output_dir(Path(config.out), config.overwrite)
    started = time.perf_counter()
    data = _load_data(config)
    source = load_source(config.model, task="sequence-classification", num_labels=len(data.labels))
    if source.kind == "plain" and source.labels != data.labels:
        raise UserError(f"the plain model's labels {source.labels} differ from the data's {data.labels}")
    max_length = min(config.max_length, source.max_length)
    encoder = Encoder(source.tokenizer, source.io.input_names, max_length, source.pad_token_id)

    torch.manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total = config.steps if config.epochs is None else max(1, int(config.epochs * steps_per_epoch))
    assert total is not None
    model = source.model
    model.train()
    settings = loop_settings(config, total)
    # Without a dev split no step is scored and the last weights are kept.
    loop = TrainingLoop(model, settings, LoopState(best_score=-1.0))
    evaluation = None
    if len(data.dev):
        evaluation = Evaluation(
            score=lambda: evaluate_accuracy(source, encoder, data.dev, data.dev_targets),
            weights=model.state_dict,
            label="acc",
            history_key="dev_accuracy",
        )
    loop.run(_batches(source, encoder, data, config), evaluation, "train")
    state = loop.state
    best_state, best_step = state.best_state, state.best_step
    if best_state is None:
        best_state, best_step = copy.deepcopy(model.state_dict()), total
    model.eval()
    result = TrainResult(
        out=str(config.out),
        labels=data.labels,
        steps=total,
        best_step=best_step,
        best_dev_accuracy=round(state.best_score, 4),
        seconds=round(time.perf_counter() - started, 1),
        history=state.history,
    )
    _write_output(config, source, best_state, result)
    return result
