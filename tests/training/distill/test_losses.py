"""Distillation losses on tensors whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trimformer.training.distill.losses import (
    LossWeights,
    attention_kl,
    combine,
    embedding_loss,
    hidden_mse,
    kd_loss,
)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_loss_known_value_at_t1() -> None:
    # Teacher p = (0.75, 0.25), student p = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5.
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_is_t_squared_kl_of_softened_distributions(temperature: float) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3)) * 3, rng.normal(size=(5, 3)) * 3
    ps, pt = _softmax(s / temperature), _softmax(t / temperature)
    expected = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean() * temperature**2
    got = kd_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(torch.tensor(t), torch.tensor(t), temperature).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_pulls_the_student_toward_the_teacher() -> None:
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    kd_loss(student, torch.tensor([[2.0, 0.0]]), 2.0).backward()
    assert student.grad is not None and student.grad[0, 0] < 0 < student.grad[0, 1]


def test_hidden_mse_ignores_padding() -> None:
    student = torch.zeros(2, 3, 4)
    teacher = torch.zeros(2, 3, 4)
    teacher[0, 0] = 2.0  # real token: squared error 4 in each of 4 dims
    teacher[1, 2] = 100.0  # padding: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # 5 real tokens x 4 dims, total squared error 16.
    assert hidden_mse(student, teacher, mask).item() == pytest.approx(16 / 20)


def test_attention_kl_known_value_masks_and_head_maps() -> None:
    # One batch row, 2 student heads, 2 query rows (the second padding), 2 keys.
    teacher = torch.tensor([[[[0.75, 0.25], [0.5, 0.5]]] * 3])  # 3 teacher heads, all alike
    teacher[0, 1] = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    student = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]] * 2])
    mask = torch.tensor([[1, 0]])
    per_row = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    # Student heads from teacher heads 0 and 2 (a pruned student): both rows hold the 0.75/0.25 row.
    got = attention_kl(student, teacher, mask, teacher_heads=[0, 2])
    assert got.item() == pytest.approx(per_row, rel=1e-5)
    # Teacher head 1 matches the student's first row exactly.
    assert attention_kl(student[:, :1], teacher[:, 1:2], mask).item() == pytest.approx(0.0, abs=1e-7)
    # Different head counts and no map: head-averaged distributions are compared.
    avg_t = np.array([(0.75 + 0.5 + 0.75) / 3, (0.25 + 0.5 + 0.25) / 3])
    expected = float((avg_t * np.log(avg_t / 0.5)).sum())
    assert attention_kl(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)


def test_embedding_losses() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    assert embedding_loss(a, b, "cosine").item() == pytest.approx(0.5)  # 1 - mean(0, 1)
    assert embedding_loss(a, b, "mse").item() == pytest.approx((1 + 9 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        embedding_loss(a, b, "l1")


def test_combine_weights_and_parts() -> None:
    rng = np.random.default_rng(1)
    s = torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32)
    t = torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 1])
    mask = torch.ones(4, 5, dtype=torch.long)
    w = LossWeights(alpha=0.3, temperature=2.0)
    total, parts = combine(w, "sequence-classification", s, t, mask, labels)
    kd = kd_loss(s, t, 2.0).item()
    ce = torch.nn.functional.cross_entropy(s, labels).item()
    assert parts == pytest.approx({"kd": kd, "ce": ce})
    assert total.item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-6)
    # Without labels the soft-target loss carries the whole weight.
    total, parts = combine(w, "sequence-classification", s, t, mask, None)
    assert set(parts) == {"kd"} and total.item() == pytest.approx(kd)
    # Intermediate terms add with their weights; a layer with no heads left is skipped.
    h = [torch.ones(4, 5, 2)], [torch.zeros(4, 5, 2)]
    attn = torch.full((4, 2, 5, 5), 0.2)
    w2 = LossWeights(alpha=1.0, hidden=2.0, attention=3.0)
    total, parts = combine(
        w2, "sequence-classification", s, t, mask, labels, *h, [attn, None], [attn, attn], [None, []]
    )
    assert parts["hidden"] == pytest.approx(1.0) and parts["attention"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(kd + 2.0, rel=1e-5)
    total, parts = combine(LossWeights(), "feature-extraction", s, s, mask)
    assert set(parts) == {"embedding"} and total.item() == pytest.approx(0.0, abs=1e-6)
