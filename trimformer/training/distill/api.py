"""Distillation: retrain a smaller student from a teacher's predictions before export.

``distill(DistillConfig(...))`` loads the teacher and the data, builds the student (layer-dropped,
pruned, shaped by a config, or an existing folder; see :mod:`.students`), trains it on the losses
of :mod:`.losses` with :func:`.trainer.train_student` (the shared loop of
:mod:`trimformer.training.loop`), and writes a model folder that ``trimformer export`` takes, with
``trimformer_distill.json`` recording the settings, the teacher's hash and the result.

With ``nproc_per_node > 1`` it checks every input once in this process, then runs the same
configuration under ``torchrun`` (:mod:`.ddp`, :mod:`.worker`); a run that torchrun started itself
(any number of machines) is detected from the environment.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trimformer import __version__
from trimformer.data import Encoder, load_dataset, map_labels
from trimformer.errors import UserError
from trimformer.fsutil import atomic_output_dir, check_output_dir, sha256_bytes
from trimformer.progress import progress_enabled
from trimformer.sources import LoadedSource, load_source
from trimformer.training.distill.ddp import (
    DistContext,
    check_process_count,
    init_distributed,
    launch_torchrun,
    under_torchrun,
)
from trimformer.training.distill.features import DistillStudent, run_spec_for
from trimformer.training.distill.losses import EMBEDDING_LOSSES, LossWeights
from trimformer.training.distill.students import (
    Student,
    StudentShape,
    build_student,
    hidden_width,
    save_student,
    word_embeddings,
)
from trimformer.training.distill.trainer import (
    CHECKPOINT_FILE,
    TrainData,
    TrainerHooks,
    TrainerSettings,
    train_student,
)
from trimformer.training.options import data_columns, loop_settings, refuse_failed, schedule_checks
from trimformer.training.qat import QATConfig, qat_hooks

__all__ = ["DISTILL_RECORD", "DistillConfig", "DistillResult", "distill", "prepare"]

logger = logging.getLogger(__name__)

DISTILL_RECORD = "trimformer_distill.json"
# Settings that do not change what is trained: left out of the checkpoint fingerprint.
_NOT_FINGERPRINTED = {
    "threads",
    "out",
    "overwrite",
    "resume",
    "checkpoint_dir",
    "keep_checkpoint",
    "device",
    "time_limit",
}


@dataclass
class DistillConfig:
    teacher: str
    data: str
    out: str
    # The student: one of layers / from_pruning / student / student_* (default: half the layers).
    layers: str | None = None
    from_pruning: str | None = None
    student: str | None = None
    student_layers: int | None = None
    student_hidden: int | None = None
    student_heads: int | None = None
    student_ffn: int | None = None
    # Losses.
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    embedding_loss: str = "cosine"
    ignore_labels: bool = False
    # None: freeze the word embeddings when the student starts from trained weights (they are most
    # of a small student's parameters and of its optimizer time), train them for a random student.
    train_embeddings: bool | None = None
    # Training.
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    max_length: int = 64
    lr: float = 1e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 200
    eval_limit: int | None = 2000
    time_limit: float | None = None
    group_by_length: bool = True
    save_every: int | None = None
    train_split: str = "train"
    dev_split: str = "dev"
    seed: int = 0
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    # Checkpoints and processes.
    checkpoint_dir: str | None = None
    resume: bool = True
    keep_checkpoint: bool = False
    nproc_per_node: int = 1
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    # Quantization-aware training (training/qat.py): int8 fake-quantization of the student's encoder,
    # for the last qat_steps steps only (0: all), with "ema" (observed) or "learned" input ranges.
    qat: bool = False
    qat_steps: int = 0
    qat_ranges: str = "ema"

    def validate(self) -> None:
        checks = [
            *schedule_checks(self),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (
                self.save_every is None or self.save_every >= 1,
                f"--save-every must be at least 1, got {self.save_every}",
            ),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}"),
            (self.hidden_weight >= 0, f"--hidden-weight must not be negative, got {self.hidden_weight}"),
            (
                self.attention_weight >= 0,
                f"--attention-weight must not be negative, got {self.attention_weight}",
            ),
            (
                self.embedding_loss in EMBEDDING_LOSSES,
                f"--embedding-loss must be one of {', '.join(EMBEDDING_LOSSES)}",
            ),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.nproc_per_node >= 1, f"--nproc-per-node must be at least 1, got {self.nproc_per_node}"),
            (
                self.eval_limit is None or self.eval_limit >= 1,
                f"--eval-limit must be at least 1, got {self.eval_limit}",
            ),
            (
                self.time_limit is None or self.time_limit > 0,
                f"--time-limit must be positive, got {self.time_limit}",
            ),
            (self.qat_steps >= 0, f"--qat-steps must be 0 (all steps) or more, got {self.qat_steps}"),
            (self.qat or self.qat_steps == 0, "--qat-steps needs --qat"),
            (
                self.qat_ranges in ("ema", "learned"),
                f"--qat-ranges must be ema or learned, got {self.qat_ranges!r}",
            ),
        ]
        refuse_failed(checks)
        shape = [self.student_layers, self.student_hidden, self.student_heads, self.student_ffn]
        if any(v is not None for v in shape) and any(v is None for v in shape):
            raise UserError(
                "a student described by its shape needs all of --student-layers, --student-hidden, "
                "--student-heads and --student-ffn"
            )

    @property
    def shape(self) -> StudentShape | None:
        if self.student_layers is None:
            return None
        return StudentShape(
            layers=int(self.student_layers),
            hidden_size=int(self.student_hidden or 0),
            heads=int(self.student_heads or 0),
            ffn_size=int(self.student_ffn or 0),
        )

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(
            alpha=self.alpha,
            temperature=self.temperature,
            hidden=self.hidden_weight,
            attention=self.attention_weight,
            embedding_loss=self.embedding_loss,
        )

    @property
    def checkpoint_path(self) -> Path:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.out)
        return out.with_name(out.name + ".ckpt")


@dataclass
class DistillResult:
    out: str
    student: dict[str, Any]
    parameters: int
    teacher_parameters: int
    steps: int
    best_step: int
    metric: str
    best_dev_score: float
    teacher_dev_score: float
    seconds: float
    train_seconds: float = 0.0
    resumed_from: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    distributed: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    teacher: LoadedSource
    student: Student
    data: TrainData
    data_name: str


def _data_name(spec: str) -> str:
    return spec if spec.startswith("builtin:") else Path(spec).name


def prepare(config: DistillConfig) -> Prepared:
    """Load and check everything a run needs; every bad input is refused here, before any output."""
    config.validate()
    columns = data_columns(config)
    train = load_dataset(config.data, split=config.train_split, seed=config.seed, **columns)
    dev = load_dataset(config.data, split=config.dev_split, seed=config.seed, **columns)
    if config.eval_limit is not None and config.eval_limit < len(dev):
        # A seeded random subset, not the head: a corpus sorted by label would give a one-class head.
        pick = np.random.default_rng(config.seed).choice(len(dev), config.eval_limit, replace=False)
        dev = dev.take(sorted(int(i) for i in pick))
    teacher = load_source(config.teacher)
    train_y = dev_y = None
    if teacher.task == "sequence-classification" and not config.ignore_labels and train.labels is not None:
        assert teacher.labels is not None
        if train.label_names and set(train.label_names) != set(teacher.labels):
            raise UserError(
                f"the data's labels {train.label_names} differ from the teacher's {teacher.labels}; "
                "distil on data of the teacher's task, or pass --ignore-labels to use its texts only"
            )
        train_y = map_labels(train.labels, teacher.labels)
        dev_y = map_labels(dev.labels, teacher.labels) if dev.labels is not None else None
    student = build_student(
        teacher,
        layers=config.layers,
        pruning=config.from_pruning,
        shape=config.shape,
        folder=config.student,
        seed=config.seed,
    )
    if config.qat and student.family == "plain":
        raise UserError(
            "--qat needs a Hugging Face BERT-family student (the plain model's attention has no Linear "
            "projections to fake-quantize); drop --qat"
        )
    if config.hidden_weight > 0 and not student.hidden_map:
        raise UserError(
            "--hidden-weight needs a layer map between student and teacher, which this student lacks"
        )
    max_length = min(config.max_length, teacher.max_length)
    encoder = Encoder(teacher.tokenizer, teacher.io.input_names, max_length, teacher.pad_token_id)
    data = TrainData(train=train, train_labels=train_y, dev=dev, dev_labels=dev_y, encoder=encoder)
    return Prepared(teacher=teacher, student=student, data=data, data_name=_data_name(config.data))


def _fingerprint(config: DistillConfig, teacher_hash: str, world: int) -> str:
    settings = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _NOT_FINGERPRINTED}
    settings.update(teacher_hash=teacher_hash, world=world, nproc_per_node=None)
    return sha256_bytes(json.dumps(settings, sort_keys=True, default=str).encode())


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trainer_settings(config: DistillConfig, fingerprint: str) -> TrainerSettings:
    return TrainerSettings(
        loop=loop_settings(config, config.steps, config.time_limit),
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        save_every=config.save_every or config.eval_every,
        seed=config.seed,
        checkpoint_dir=config.checkpoint_path,
        resume=config.resume,
        fingerprint=fingerprint,
        group_by_length=config.group_by_length,
    )


def distill(config: DistillConfig, hooks: TrainerHooks | None = None) -> DistillResult:
    """Run a distillation; in ``nproc_per_node`` processes under torchrun when asked."""
    config.validate()
    if config.nproc_per_node > 1 and not under_torchrun():
        if hooks is not None:
            raise ValueError("trainer hooks cannot cross into torchrun's processes; run single-process")
        check_process_count(config.nproc_per_node, config.device)
        check_output_dir(Path(config.out), config.overwrite)
        prepare(config)  # refuse bad input here, in one line, before any process starts
        shown = progress_enabled()
        return DistillResult(**launch_torchrun(asdict(config), config.nproc_per_node, progress=shown))
    return run_distillation(config, hooks)


def run_distillation(config: DistillConfig, hooks: TrainerHooks | None = None) -> DistillResult:
    """The run itself, in this process (one rank of a group when torchrun started it)."""
    started = time.perf_counter()
    config.validate()
    check_output_dir(Path(config.out), config.overwrite)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    ctx = init_distributed(config.device)
    try:
        return _run(config, hooks, ctx, started)
    finally:
        ctx.close()


def _run(
    config: DistillConfig, hooks: TrainerHooks | None, ctx: DistContext, started: float
) -> DistillResult:
    prepared = prepare(config)
    teacher, student = prepared.teacher, prepared.student
    if config.qat:
        if hooks is not None:
            raise ValueError("--qat brings its own trainer hooks; pass no other hooks with it")
        hooks = qat_hooks(QATConfig(steps=config.steps, qat_steps=config.qat_steps, mode=config.qat_ranges))
    weights = config.loss_weights
    wrapped = _wrap_student(config, prepared)
    settings = _trainer_settings(config, _fingerprint(config, teacher.files_hash, ctx.world))
    outcome = train_student(
        wrapped, teacher.model, run_spec_for(teacher), prepared.data, weights, settings, ctx,
        hooks=hooks, head_maps=student.head_maps, description=f"distill {student.kind}",
    )  # fmt: skip
    distributed = {
        "world_size": ctx.world,
        "backend": ctx.backend,
        "shards": ctx.gather(outcome.shard),
        "param_sha256": ctx.gather(outcome.param_sha256),
    }
    student.model.load_state_dict(outcome.best_state)
    result = DistillResult(
        out=str(config.out),
        student={**student.description, "family": student.family},
        parameters=_count(student.model),
        teacher_parameters=_count(teacher.model),
        steps=outcome.steps,
        best_step=outcome.best_step,
        metric=outcome.metric,
        best_dev_score=outcome.best_score,
        teacher_dev_score=outcome.teacher_score,
        seconds=round(time.perf_counter() - started, 1),
        train_seconds=outcome.seconds,
        resumed_from=outcome.resumed_from,
        history=outcome.history,
        distributed=distributed,
    )
    if ctx.is_main:
        _write_output(config, prepared, hooks, result)
        if not config.keep_checkpoint:
            _remove_checkpoint(config.checkpoint_path)
    ctx.barrier()
    return result


def _wrap_student(config: DistillConfig, prepared: Prepared) -> DistillStudent:
    """The student with its width projections, and its word embeddings frozen unless trained."""
    teacher, student = prepared.teacher, prepared.student
    weights = config.loss_weights
    torch.manual_seed(config.seed)  # projections start the same on every rank and every run
    wrapped = DistillStudent(
        student.model,
        run_spec_for(teacher),
        student.hidden_map,
        student.attention_map,
        student_width=student.width,
        teacher_width=hidden_width(teacher.model),
        use_hidden=weights.hidden > 0,
        use_attention=weights.attention > 0,
        headless_layers=student.headless_layers,
    )
    train_embeddings = config.train_embeddings
    if train_embeddings is None:
        train_embeddings = student.kind == "config"
    if not train_embeddings:
        word_embeddings(student.model).requires_grad_(False)
    return wrapped


def _remove_checkpoint(folder: Path) -> None:
    """A finished run's checkpoint goes, and its folder too once empty."""
    ckpt = folder / CHECKPOINT_FILE
    if ckpt.is_file():
        ckpt.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def _write_output(
    config: DistillConfig, prepared: Prepared, hooks: TrainerHooks | None, result: DistillResult
) -> None:
    teacher, student = prepared.teacher, prepared.student
    model = student.model.cpu()
    if hooks is not None and hooks.before_save is not None:
        model = hooks.before_save(model)
    params = {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if f.name
        not in ("teacher", "data", "out", "overwrite", "checkpoint_dir", "resume", "keep_checkpoint")
    }
    record = {
        "trimformer": __version__,
        "step": "distill",
        "teacher": str(config.teacher),
        "teacher_hash": teacher.files_hash,
        "data": prepared.data_name,
        "student": result.student,
        "layer_map": {
            "hidden": [list(p) for p in student.hidden_map],
            "attention": [list(p) for p in student.attention_map],
        },
        "params": params,
        "result": {k: v for k, v in result.to_dict().items() if k not in ("out", "student")},
    }
    with atomic_output_dir(Path(config.out), overwrite=config.overwrite) as tmp:
        save_student(model, student.family, teacher, tmp, student.pruning_record)
        if hooks is not None and hooks.write_files is not None:
            hooks.write_files(tmp)
        (tmp / DISTILL_RECORD).write_text(
            json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
        )
    logger.info("distilled student saved to %s", config.out)
