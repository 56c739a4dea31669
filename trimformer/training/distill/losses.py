"""Distillation losses: what the student is pulled towards, each a small pure function of tensors.

* :func:`kd_loss` - Hinton's soft-target loss: KL(teacher || student) on temperature-softened
  logits, scaled by T² so its gradients keep their size as T changes.
* :func:`hidden_mse` - TinyBERT's hidden-state loss on real (unpadded) tokens.
* :func:`attention_kl` - MiniLM's attention-distribution loss: KL(teacher || student) per head and
  query row, averaged over real query tokens.
* :func:`embedding_loss` - for feature-extraction models: cosine distance or MSE between sentence
  embeddings.

:class:`LossWeights` combines them; :func:`combine` returns the total and the parts for logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = [
    "EMBEDDING_LOSSES",
    "LossWeights",
    "attention_kl",
    "combine",
    "embedding_loss",
    "hidden_mse",
    "kd_loss",
]

EMBEDDING_LOSSES = ("cosine", "mse")
# Floor for probabilities under a log: masked keys get exactly 0 from softmax in float32.
_EPS = 1e-12


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * (t * t)


def _token_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype).unsqueeze(-1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real tokens of ``[batch, seq, hidden]`` states (padding ignored)."""
    weights = _token_weights(mask, student)
    squared = (student.float() - teacher.float()).pow(2) * weights
    return squared.sum() / (weights.sum() * student.shape[-1]).clamp(min=1.0)


def attention_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    teacher_heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of attention distributions ``[batch, heads, query, key]``.

    Summed over keys, averaged over heads and real query rows. ``teacher_heads`` names the teacher
    head each student head came from (a pruned student); without it, equal head counts are compared
    head by head and different counts through the head-averaged distribution (still a distribution).
    """
    if teacher_heads is not None:
        index = torch.as_tensor(list(teacher_heads), dtype=torch.long, device=teacher.device)
        teacher = teacher.index_select(1, index)
    if student.shape[1] != teacher.shape[1]:
        student = student.mean(dim=1, keepdim=True)
        teacher = teacher.mean(dim=1, keepdim=True)
    s = student.float().clamp(min=_EPS)
    t = teacher.float()
    per_row = (torch.xlogy(t, t) - t * s.log()).sum(-1)  # [batch, heads, query]
    rows = mask.to(per_row.dtype)[:, None, :]
    return (per_row * rows).sum() / (rows.sum() * per_row.shape[1]).clamp(min=1.0)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """1 - cosine similarity (default) or MSE between ``[batch, dim]`` sentence embeddings."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    raise ValueError(f"unknown embedding loss {kind!r}; choose one of {EMBEDDING_LOSSES}")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms.

    For a labelled classifier the soft-target term gets ``alpha`` and cross-entropy ``1 - alpha``;
    without labels (pure distillation) and for embedding models the output term gets weight 1.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    hidden: float = 0.0
    attention: float = 0.0
    embedding_loss: str = "cosine"

    @property
    def needs_intermediates(self) -> bool:
        return self.hidden > 0 or self.attention > 0


def combine(
    weights: LossWeights,
    task: str,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    student_hidden: Sequence[torch.Tensor] = (),
    teacher_hidden: Sequence[torch.Tensor] = (),
    student_attn: Sequence[torch.Tensor | None] = (),
    teacher_attn: Sequence[torch.Tensor | None] = (),
    head_maps: Sequence[Sequence[int] | None] = (),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its weighted-free parts (for the progress bar and the history)."""
    parts: dict[str, torch.Tensor] = {}
    if task == "feature-extraction":
        parts["embedding"] = embedding_loss(student_out, teacher_out, weights.embedding_loss)
        total = parts["embedding"]
    else:
        parts["kd"] = kd_loss(student_out, teacher_out, weights.temperature)
        if labels is not None and weights.alpha < 1.0:
            parts["ce"] = F.cross_entropy(student_out.float(), labels)
            total = weights.alpha * parts["kd"] + (1.0 - weights.alpha) * parts["ce"]
        else:
            total = parts["kd"]
    if weights.hidden > 0 and student_hidden:
        terms = [hidden_mse(s, t, mask) for s, t in zip(student_hidden, teacher_hidden, strict=True)]
        parts["hidden"] = torch.stack(terms).mean()
        total = total + weights.hidden * parts["hidden"]
    if weights.attention > 0 and student_attn:
        maps = list(head_maps) or [None] * len(student_attn)
        # A layer whose heads were all pruned has no distribution to match.
        terms = [
            attention_kl(s, t, mask, heads)
            for s, t, heads in zip(student_attn, teacher_attn, maps, strict=True)
            if s is not None and t is not None and (heads is None or len(heads) > 0)
        ]
        if terms:
            parts["attention"] = torch.stack(terms).mean()
            total = total + weights.attention * parts["attention"]
    return total, {name: float(value.detach()) for name, value in parts.items()}
