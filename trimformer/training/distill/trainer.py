"""Distillation's side of the training loop: sharded micro-batches with gradient accumulation, the
teacher's targets, the dev score, checkpoints that an interrupted run resumes from exactly, and
DistributedDataParallel when a process group is up. The loop itself (optimizer, schedule,
clipping, evaluation with best-weights keeping) is :class:`trimformer.training.loop.TrainingLoop`,
which fine-tuning uses too.

Kept separate from what is trained so later stages (quantization-aware training) can reuse it:
:class:`TrainerHooks` lets a caller wrap the student's layers before the optimizer sees them,
watch every step, and turn the trained module back into a plain one before it is saved.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trimformer.data import Encoder, TextDataset
from trimformer.errors import UserError
from trimformer.training.distill.ddp import DistContext
from trimformer.training.distill.features import DistillStudent, RunSpec, model_features
from trimformer.training.distill.losses import LossWeights, combine
from trimformer.training.loop import Evaluation, LoopSettings, TrainingLoop

__all__ = [
    "CHECKPOINT_FILE",
    "ShardStream",
    "TrainOutcome",
    "TrainerHooks",
    "TrainerSettings",
    "train_student",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainerSettings:
    loop: LoopSettings  # steps, learning rate and schedule, evaluation interval, time limit
    batch_size: int
    grad_accum: int
    save_every: int
    seed: int
    checkpoint_dir: Path | None
    resume: bool
    fingerprint: str
    # Batch rows of similar length together (less padding); off gives plain random batches.
    group_by_length: bool = True


@dataclass
class TrainerHooks:
    """Extension points. ``wrap_student`` edits the student in place before the optimizer is built
    (e.g. swaps Linear layers for fake-quantized ones); ``on_step(step, info)`` sees every finished
    step; ``before_save(student)`` returns the module to save (e.g. with the wrappers folded);
    ``keep_best(step)`` says whether that step's weights may be kept as the best (QAT: only
    fake-quantized ones); ``write_files(folder)`` adds files to the output folder before it is
    renamed into place."""

    wrap_student: Callable[[nn.Module], None] | None = None
    on_step: Callable[[int, dict[str, float]], None] | None = None
    before_save: Callable[[nn.Module], nn.Module] | None = None
    keep_best: Callable[[int], bool] | None = None
    write_files: Callable[[Path], None] | None = None


@dataclass
class TrainData:
    train: TextDataset
    train_labels: np.ndarray | None
    dev: TextDataset
    dev_labels: np.ndarray | None
    encoder: Encoder


@dataclass
class TrainOutcome:
    best_state: dict[str, torch.Tensor]
    best_step: int
    best_score: float
    metric: str
    teacher_score: float
    steps: int
    resumed_from: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    shard: dict[str, Any] = field(default_factory=dict)
    param_sha256: str = ""


class ShardStream:
    """Which training rows each rank reads at each micro-batch, from the step number alone.

    The rows form one endless stream (a fresh seeded permutation per epoch); micro-batch ``k`` of the
    whole job takes the next ``batch_size × world`` rows and rank ``r`` the ``r``-th slice of them.
    Because position follows from the step, a resumed run reads exactly what the interrupted run
    would have, and the ranks never read the same row within a global batch.
    """

    def __init__(
        self,
        rows: int,
        batch_size: int,
        world: int,
        rank: int,
        seed: int,
        lengths: np.ndarray | None = None,
        group: int = 50,
    ) -> None:
        self.rows, self.batch_size, self.world, self.rank, self.seed = rows, batch_size, world, rank, seed
        span = batch_size * world
        # Each epoch drops its last partial global batch (like DistributedSampler's drop_last), so
        # no global batch straddles two epochs and holds a row twice.
        self.epoch_rows = rows - rows % span if rows >= span else rows
        self.lengths = lengths
        self.group = group
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.rows)[: self.epoch_rows]
            span = self.batch_size * self.world
            if self.lengths is not None and self.epoch_rows >= span:
                # Length grouping: sort runs of `group` global batches by length, then shuffle the
                # batches; each batch pads to similar lengths, which on CPU is most of the speed.
                chunk = span * self.group
                for start in range(0, len(order), chunk):
                    part = order[start : start + chunk]
                    order[start : start + chunk] = part[np.argsort(self.lengths[part], kind="stable")]
                batches = order.reshape(-1, span)
                order = batches[rng.permutation(len(batches))].reshape(-1)
            self._perms[epoch] = order
        return self._perms[epoch]

    def _take(self, start: int, count: int) -> np.ndarray:
        parts, pos = [], start
        while count > 0:
            epoch, offset = divmod(pos, self.epoch_rows)
            chunk = self._perm(epoch)[offset : offset + count]
            parts.append(chunk)
            pos += len(chunk)
            count -= len(chunk)
        return np.concatenate(parts)

    def micro_batch(self, index: int) -> np.ndarray:
        span = self.batch_size * self.world
        rows = self._take(index * span, span)
        return rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def _to_device(feeds: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array).to(device) for name, array in feeds.items()}


def param_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (after a checkpoint); a second
    signal interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: saving a checkpoint at the end of this step")

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


class _Evaluator:
    """Dev-split score: accuracy with labels, agreement with the teacher without, and mean cosine to
    the teacher's embeddings for feature extraction. The dev rows are sharded over the ranks and the
    counts summed; batches are length-sorted once to pad little."""

    def __init__(
        self,
        data: TrainData,
        teacher: nn.Module,
        teacher_spec: RunSpec,
        ctx: DistContext,
        batch_size: int = 64,
    ) -> None:
        self.ctx = ctx
        self.task = teacher_spec.task
        dev = data.dev
        mine = np.arange(ctx.rank, len(dev), ctx.world)
        lengths = np.array([len(dev.texts[i]) + len(dev.pairs[i] if dev.pairs else "") for i in mine])
        mine = mine[np.argsort(lengths, kind="stable")]
        self.batches: list[tuple[dict[str, torch.Tensor], np.ndarray]] = []
        for start in range(0, len(mine), batch_size):
            rows = mine[start : start + batch_size]
            texts = [dev.texts[i] for i in rows]
            pairs = None if dev.pairs is None else [dev.pairs[i] for i in rows]
            self.batches.append((_to_device(data.encoder(texts, pairs), ctx.device), rows))
        self.labels = data.dev_labels
        if self.task == "feature-extraction":
            self.metric = "cosine_to_teacher"
        else:
            self.metric = "accuracy" if self.labels is not None else "agreement_with_teacher"
        self.teacher_outputs: list[torch.Tensor] = []
        with torch.no_grad():
            for feeds, _ in self.batches:
                self.teacher_outputs.append(model_features(teacher, teacher_spec, feeds).output)
        self.teacher_score = self._score(self.teacher_outputs)

    def _score(self, outputs: list[torch.Tensor]) -> float:
        total, count = 0.0, 0.0
        for out, (_, rows), reference in zip(outputs, self.batches, self.teacher_outputs, strict=True):
            count += len(rows)
            if self.metric == "cosine_to_teacher":
                total += float(torch.nn.functional.cosine_similarity(out, reference, dim=-1).sum())
            elif self.metric == "accuracy":
                assert self.labels is not None
                total += float((out.argmax(-1).cpu().numpy() == self.labels[rows]).sum())
            else:
                total += float((out.argmax(-1) == reference.argmax(-1)).sum())
        total, count = self.ctx.sum([total, count])
        return total / max(count, 1.0)

    def __call__(self, wrapped: DistillStudent) -> float:
        was_training = wrapped.training
        wrapped.eval()
        outputs = []
        with torch.no_grad():
            for feeds, _ in self.batches:
                out = model_features(wrapped.student, wrapped.spec, feeds).output
                if wrapped.embedding_projection is not None:
                    out = wrapped.embedding_projection(out)
                outputs.append(out)
        wrapped.train(was_training)
        return self._score(outputs)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"checkpoint {path} cannot be read ({str(exc).splitlines()[0][:120]}); delete it to start over"
        ) from exc
    if payload.get("fingerprint") != fingerprint:
        raise UserError(
            f"checkpoint {path.parent} belongs to a run with other settings; delete it, or pass --no-resume to start over"
        )
    return payload


class _TeacherTargets:
    """The teacher's side of each micro-batch: its logits, cached per row when they are all the
    losses need (the teacher runs in eval mode, so they never change), or all its features."""

    def __init__(self, teacher: nn.Module, spec: RunSpec, intermediates: bool) -> None:
        self.teacher, self.spec, self.intermediates = teacher, spec, intermediates
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, rows: np.ndarray, feeds: dict[str, torch.Tensor]) -> Any:
        if not self.intermediates and all(int(r) in self.cache for r in rows):
            return torch.stack([self.cache[int(r)] for r in rows])
        with torch.no_grad():
            feats = model_features(self.teacher, self.spec, feeds, self.intermediates)
        if not self.intermediates:
            for r, out in zip(rows, feats.output, strict=True):
                self.cache[int(r)] = out
            return feats.output
        return feats


@dataclass
class _Losses:
    """The weighted distillation losses of one micro-batch, from the student's mapped features."""

    weights: LossWeights
    task: str
    wrapped: DistillStudent
    head_maps: list[list[int] | None] | None

    def __call__(
        self, out: dict[str, Any], target: Any, feeds: dict[str, torch.Tensor], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.weights.needs_intermediates:
            t_hidden = [target.hidden[t] for _, t in self.wrapped.hidden_map]
            t_attn = [target.attentions[t] for _, t in self.wrapped.attention_map]
            maps = list(self.head_maps) if self.head_maps else [None] * len(t_attn)
            teacher_out = target.output
        else:
            t_hidden, t_attn, maps, teacher_out = [], [], [], target
        return combine(
            self.weights, self.task, out["output"], teacher_out, feeds["attention_mask"], labels,
            out["hidden"], t_hidden, out["attentions"], t_attn, maps,
        )  # fmt: skip


class _MicroBatches:
    """One optimizer step's micro-batches (a :data:`~trimformer.training.loop.StepFn`): this rank's
    rows of the shard stream, the teacher's targets, the student's losses and their backward pass.
    Also records which rows this rank read, for the result's shard report."""

    def __init__(
        self,
        model: nn.Module,
        targets: _TeacherTargets,
        losses: _Losses,
        data: TrainData,
        settings: TrainerSettings,
        ctx: DistContext,
    ) -> None:
        self.model, self.targets, self.losses, self.data, self.ctx = model, targets, losses, data, ctx
        self.accum = settings.grad_accum
        texts, pairs = data.train.texts, data.train.pairs
        lengths = None
        if settings.group_by_length:
            lengths = np.array([len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)])
        self.stream = ShardStream(
            len(texts), settings.batch_size, ctx.world, ctx.rank, settings.seed, lengths
        )
        self.digest, self.rows_read = hashlib.sha256(), 0
        self.first_rows: list[int] = []

    def __call__(self, step: int) -> Iterator[dict[str, float]]:
        for micro in range(self.accum):
            rows = self.stream.micro_batch((step - 1) * self.accum + micro)
            if not self.first_rows:
                self.first_rows = [int(r) for r in rows]
            self.digest.update(rows.astype(np.int64).tobytes())
            self.rows_read += len(rows)
            yield self._backward(rows, last=micro == self.accum - 1)

    def shard(self) -> dict[str, Any]:
        return {
            "rank": self.ctx.rank,
            "rows": self.rows_read,
            "sha256": self.digest.hexdigest(),
            "first_rows": self.first_rows,
        }

    def _backward(self, rows: np.ndarray, last: bool) -> dict[str, float]:
        train = self.data.train
        pairs = None if train.pairs is None else [train.pairs[i] for i in rows]
        feeds = _to_device(self.data.encoder([train.texts[i] for i in rows], pairs), self.ctx.device)
        target = self.targets(rows, feeds)
        labels = None
        if self.data.train_labels is not None:
            labels = torch.from_numpy(self.data.train_labels[rows]).to(self.ctx.device)
        # Gradients are averaged across ranks once, on the step's last micro-batch.
        sync = (
            self.model.no_sync()  # type: ignore[operator]
            if self.ctx.distributed and not last
            else contextlib.nullcontext()
        )
        with sync:
            loss, parts = self.losses(self.model(feeds), target, feeds, labels)
            (loss / self.accum).backward()
        return parts


class _Checkpoints:
    """The run's checkpoint file: the loop's state, the student and every rank's RNG state."""

    def __init__(
        self, settings: TrainerSettings, wrapped: DistillStudent, loop: TrainingLoop, ctx: DistContext
    ):
        self.settings, self.wrapped, self.loop, self.ctx = settings, wrapped, loop, ctx
        self.path = None if settings.checkpoint_dir is None else settings.checkpoint_dir / CHECKPOINT_FILE

    def resume(self) -> None:
        """Continue from the checkpoint, if resuming and there is one."""
        if self.path is None or not self.settings.resume:
            return
        payload = _load_checkpoint(self.path, self.settings.fingerprint)
        if payload is None:
            return
        self.wrapped.load_state_dict(payload["model"])
        self.loop.restore(payload)
        rng_states = payload["rng"]
        torch.set_rng_state(rng_states[self.ctx.rank % len(rng_states)])
        logger.info(
            "resuming from step %d of %d (%s)", self.loop.state.step, self.settings.loop.steps, self.path
        )

    def save(self) -> None:
        rng = self.ctx.gather(torch.get_rng_state())  # every rank takes part; the main one writes
        if self.path is None or not self.ctx.is_main:
            return
        payload = {"fingerprint": self.settings.fingerprint, **self.loop.checkpoint()}
        payload.update(model=self.wrapped.state_dict(), rng=rng)
        _save_checkpoint(self.path, payload)


def _prepare_models(
    wrapped: DistillStudent, teacher: nn.Module, hooks: TrainerHooks, ctx: DistContext
) -> None:
    teacher.eval().to(ctx.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if hooks.wrap_student is not None:
        hooks.wrap_student(wrapped.student)
    wrapped.to(ctx.device).train()


def _parallel(wrapped: DistillStudent, teacher_spec: RunSpec, ctx: DistContext) -> nn.Module:
    """The module each step calls: the student itself, or its DistributedDataParallel wrapper."""
    if not ctx.distributed:
        return wrapped
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        wrapped,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=teacher_spec.task == "feature-extraction",
    )


def train_student(
    wrapped: DistillStudent,
    teacher: nn.Module,
    teacher_spec: RunSpec,
    data: TrainData,
    weights: LossWeights,
    settings: TrainerSettings,
    ctx: DistContext,
    hooks: TrainerHooks | None = None,
    head_maps: list[list[int] | None] | None = None,  # one per entry of wrapped.attention_map
    description: str = "distill",
) -> TrainOutcome:
    """Train ``wrapped`` (the student and its projections) against ``teacher``; returns the best
    student weights by the dev score."""
    hooks = hooks or TrainerHooks()
    started = time.perf_counter()
    _prepare_models(wrapped, teacher, hooks, ctx)
    torch.manual_seed(settings.seed + ctx.rank)
    loop = TrainingLoop(wrapped, settings.loop)
    checkpoints = _Checkpoints(settings, wrapped, loop, ctx)
    checkpoints.resume()
    start_step = loop.state.step
    model = _parallel(wrapped, teacher_spec, ctx)  # after resuming: DDP starts from rank 0's weights
    evaluator = _Evaluator(data, teacher, teacher_spec, ctx)
    targets = _TeacherTargets(teacher, teacher_spec, weights.needs_intermediates)
    losses = _Losses(weights, teacher_spec.task, wrapped, head_maps)
    batches = _MicroBatches(model, targets, losses, data, settings, ctx)
    evaluation = Evaluation(
        score=lambda: evaluator(wrapped),
        weights=wrapped.student.state_dict,
        label=evaluator.metric,
        may_keep=hooks.keep_best,
        note=f", teacher {evaluator.teacher_score:.4f}",
    )
    stop = _StopRequest()

    def after_step(step: int) -> None:
        if hooks.on_step is not None:
            hooks.on_step(step, dict(loop.state.running))
        stopping = ctx.any(stop.requested)
        if stopping or (step % settings.save_every == 0 and step < settings.loop.steps):
            checkpoints.save()
        if stopping:
            ctx.barrier()
            raise KeyboardInterrupt

    with stop.installed():
        stopped_at = loop.run(batches, evaluation, description, after_step, agree=ctx.any, started=started)
    state = loop.state
    if state.best_state is None:
        state.best_state, state.best_step = copy.deepcopy(wrapped.student.state_dict()), settings.loop.steps
        state.best_score = evaluator(wrapped)
    return TrainOutcome(
        best_state=state.best_state,
        best_step=state.best_step,
        best_score=round(float(state.best_score), 4),
        metric=evaluator.metric,
        teacher_score=round(evaluator.teacher_score, 4),
        steps=stopped_at,
        resumed_from=start_step,
        seconds=round(time.perf_counter() - started, 1),
        history=state.history,
        shard=batches.shard(),
        param_sha256=param_sha256(wrapped),
    )
