"""The distillation training loop: AdamW with warm-up and linear decay, gradient accumulation,
evaluation on a dev split with best-weights keeping, checkpoints that an interrupted run resumes
from exactly, and DistributedDataParallel when a process group is up.

Kept separate from what is trained so later stages (quantization-aware training) can reuse it:
:class:`TrainerHooks` lets a caller wrap the student's layers before the optimizer sees them,
watch every step, and turn the trained module back into a plain one before it is saved.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
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
from trimformer.progress import progress_bar
from trimformer.training.distill.ddp import DistContext
from trimformer.training.distill.features import DistillStudent, RunSpec, model_features
from trimformer.training.distill.losses import LossWeights, combine

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
    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup: float
    weight_decay: float
    eval_every: int
    save_every: int
    seed: int
    checkpoint_dir: Path | None
    resume: bool
    fingerprint: str
    max_grad_norm: float = 1.0
    # Stop (after an evaluation) once training has run this long; the schedule still spans `steps`.
    time_limit: float | None = None
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


def _schedule(total: int, warmup: float) -> Callable[[int], float]:
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _optimizer(model: nn.Module, settings: TrainerSettings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )


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
    device = ctx.device
    teacher.eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if hooks.wrap_student is not None:
        hooks.wrap_student(wrapped.student)
    wrapped.to(device).train()
    torch.manual_seed(settings.seed + ctx.rank)

    optimizer = _optimizer(wrapped, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings.steps, settings.warmup))
    ckpt_path = None if settings.checkpoint_dir is None else settings.checkpoint_dir / CHECKPOINT_FILE
    start_step, history, best_score, best_step = 0, [], -math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    running: dict[str, float] = {}
    payload = _load_checkpoint(ckpt_path, settings.fingerprint) if ckpt_path and settings.resume else None
    if payload is not None:
        wrapped.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        start_step, history, running = (
            int(payload["step"]),
            list(payload["history"]),
            dict(payload["running"]),
        )
        best_score, best_step, best_state = (
            float(payload["best_score"]),
            int(payload["best_step"]),
            payload["best_state"],
        )
        rng_states = payload["rng"]
        torch.set_rng_state(rng_states[ctx.rank % len(rng_states)])
        logger.info("resuming from step %d of %d (%s)", start_step, settings.steps, ckpt_path)

    model: nn.Module = wrapped
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            wrapped,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=teacher_spec.task == "feature-extraction",
        )
    evaluator = _Evaluator(data, teacher, teacher_spec, ctx)
    lengths = None
    if settings.group_by_length:
        pairs = data.train.pairs
        lengths = np.array([len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(data.train.texts)])
    stream = ShardStream(len(data.train), settings.batch_size, ctx.world, ctx.rank, settings.seed, lengths)
    intermediates = weights.needs_intermediates
    cache: dict[int, torch.Tensor] = {}
    shard_digest, shard_rows = hashlib.sha256(), 0
    first_rows: list[int] = []
    stop = _StopRequest()

    def teacher_batch(rows: np.ndarray, feeds: dict[str, torch.Tensor]) -> Any:
        # Logits alone are cached per row: the teacher runs in eval mode, so they never change.
        if not intermediates and all(int(r) in cache for r in rows):
            return torch.stack([cache[int(r)] for r in rows])
        with torch.no_grad():
            feats = model_features(teacher, teacher_spec, feeds, intermediates)
        if not intermediates:
            for r, out in zip(rows, feats.output, strict=True):
                cache[int(r)] = out
            return feats.output
        return feats

    def save(step: int) -> None:
        rng = ctx.gather(torch.get_rng_state())
        if ckpt_path is None or not ctx.is_main:
            return
        _save_checkpoint(
            ckpt_path,
            {
                "fingerprint": settings.fingerprint,
                "step": step,
                "model": wrapped.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "running": running,
                "best_score": best_score,
                "best_step": best_step,
                "best_state": best_state,
                "rng": rng,
            },
        )

    def describe(dev: str = "") -> str:
        losses = "  ".join(f"{k} {v:.3f}" for k, v in running.items())
        return f"{losses}{dev}"

    total = settings.steps
    dev_info = ""
    stopped_at = total
    with stop.installed(), progress_bar(description, total) as bar:
        task_id = bar.task_ids[0]
        bar.update(task_id, completed=start_step)
        for step in range(start_step + 1, total + 1):
            for micro in range(settings.grad_accum):
                rows = stream.micro_batch((step - 1) * settings.grad_accum + micro)
                if step <= 1 + start_step and micro == 0 and not first_rows:
                    first_rows = [int(r) for r in rows]
                shard_digest.update(rows.astype(np.int64).tobytes())
                shard_rows += len(rows)
                texts = [data.train.texts[i] for i in rows]
                pairs = None if data.train.pairs is None else [data.train.pairs[i] for i in rows]
                feeds = _to_device(data.encoder(texts, pairs), device)
                target = teacher_batch(rows, feeds)
                labels = None
                if data.train_labels is not None:
                    labels = torch.from_numpy(data.train_labels[rows]).to(device)
                sync = (
                    model.no_sync()  # type: ignore[operator]
                    if ctx.distributed and micro < settings.grad_accum - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    out = model(feeds)
                    if intermediates:
                        t_hidden = [target.hidden[t] for _, t in wrapped.hidden_map]
                        t_attn = [target.attentions[t] for _, t in wrapped.attention_map]
                        maps = list(head_maps) if head_maps else [None] * len(t_attn)
                        teacher_out = target.output
                    else:
                        t_hidden, t_attn, maps, teacher_out = [], [], [], target
                    loss, parts = combine(
                        weights, teacher_spec.task, out["output"], teacher_out, feeds["attention_mask"], labels,
                        out["hidden"], t_hidden, out["attentions"], t_attn, maps,
                    )  # fmt: skip
                    (loss / settings.grad_accum).backward()
                for key, value in parts.items():
                    running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(wrapped.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            out_of_time = settings.time_limit is not None and ctx.any(
                time.perf_counter() - started > settings.time_limit
            )
            if step % settings.eval_every == 0 or step == total or out_of_time:
                score = evaluator(wrapped)
                history.append(
                    {"step": step, **{k: round(v, 4) for k, v in running.items()}, "dev": round(score, 4)}
                )
                if score > best_score and (hooks.keep_best is None or hooks.keep_best(step)):
                    best_score, best_step = score, step
                    best_state = copy.deepcopy(wrapped.student.state_dict())
                dev_info = f"  dev {evaluator.metric} {score:.4f} (best {best_score:.4f}, teacher {evaluator.teacher_score:.4f})"
                logger.info("step %d: %s", step, describe(dev_info))
            bar.update(task_id, advance=1, info=describe(dev_info))
            if hooks.on_step is not None:
                hooks.on_step(step, dict(running))
            stopping = ctx.any(stop.requested)
            if stopping or (step % settings.save_every == 0 and step < total):
                save(step)
            if stopping:
                ctx.barrier()
                raise KeyboardInterrupt
            if out_of_time:
                logger.warning(
                    "time limit of %.0f s reached at step %d of %d", settings.time_limit, step, total
                )
                stopped_at = step
                break
    if best_state is None:
        best_state, best_step, best_score = (
            copy.deepcopy(wrapped.student.state_dict()),
            total,
            evaluator(wrapped),
        )
    return TrainOutcome(
        best_state=best_state,
        best_step=best_step,
        best_score=round(float(best_score), 4),
        metric=evaluator.metric,
        teacher_score=round(evaluator.teacher_score, 4),
        steps=stopped_at,
        resumed_from=start_step,
        seconds=round(time.perf_counter() - started, 1),
        history=history,
        shard={
            "rank": ctx.rank,
            "rows": shard_rows,
            "sha256": shard_digest.hexdigest(),
            "first_rows": first_rows,
        },
        param_sha256=param_sha256(wrapped),
    )
