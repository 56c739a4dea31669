"""Choosing which heads and neurons to remove under a budget.

Two ways to state a budget:

* per kind: ``heads=0.5`` removes the least important half of all heads, ``ffn=0.5`` half of all
  feed-forward neurons, ranked across layers;
* one global target: ``flops=0.5`` (or ``params=0.5``) removes half of the encoder's FLOPs (or
  parameters), choosing heads and neurons together by importance per unit of cost, with the
  mask search of Kwon et al. 2022 (Algorithm 1): for every number of kept heads, fill the rest of
  the budget with the most important neurons, and keep the split with the most total importance.

A per-layer minimum of heads and neurons is always kept (the most important ones).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from trimformer.errors import UserError
from trimformer.passes.graph import EncoderLayout
from trimformer.passes.prune.importance import Scores
from trimformer.passes.prune.surgery import LayerPlan

__all__ = ["Budget", "LayerCosts", "layer_costs", "select_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    heads: float | None = None
    ffn: float | None = None
    flops: float | None = None
    params: float | None = None
    min_heads: int = 0
    min_neurons: int = 0


@dataclass(frozen=True)
class LayerCosts:
    """FLOPs (per sequence of ``seq_len`` tokens) and parameters of one head and one neuron."""

    head_flops: float
    neuron_flops: float
    head_params: int
    neuron_params: int


def layer_costs(hidden: int, head_dim: int, seq_len: int) -> LayerCosts:
    s = seq_len
    # Q, K, V and output projections (2 FLOPs per multiply-add), scores and context.
    head_flops = 2 * s * hidden * head_dim * 4 + 2 * 2 * s * s * head_dim
    neuron_flops = 2 * 2 * s * hidden
    return LayerCosts(
        float(head_flops), float(neuron_flops), 4 * hidden * head_dim + 3 * head_dim, 2 * hidden + 1
    )


def _protected(scores: list[np.ndarray], minimum: int) -> list[set[int]]:
    return [set(np.argsort(-s, kind="stable")[: min(minimum, len(s))].tolist()) for s in scores]


def _remove_lowest(scores: list[np.ndarray], ratio: float, minimum: int) -> list[set[int]]:
    """Indices to remove per layer: the globally lowest-scoring ``floor(ratio * total)`` units."""
    total = sum(len(s) for s in scores)
    count = math.floor(ratio * total + 1e-9)
    protected = _protected(scores, minimum)
    candidates = [
        (float(s[j]), i, j) for i, s in enumerate(scores) for j in range(len(s)) if j not in protected[i]
    ]
    candidates.sort()
    removed: list[set[int]] = [set() for _ in scores]
    for _, i, j in candidates[:count]:
        removed[i].add(j)
    return removed


def _normalise(scores: list[np.ndarray], cost: float) -> list[np.ndarray]:
    """Give a kind's scores the mean importance per unit cost of 1, so that two kinds compare."""
    mean = float(np.mean(np.concatenate(scores))) if scores else 0.0
    if mean <= 0:
        return [np.full_like(s, cost, dtype=np.float64) for s in scores]
    return [s.astype(np.float64) / mean * cost for s in scores]


def _global_search(
    scores: Scores,
    costs: LayerCosts,
    ratio: float,
    use_flops: bool,
    budget: Budget,
    comparable: bool,
    fixed: float,
) -> tuple[list[set[int]], list[set[int]]]:
    head_cost = costs.head_flops if use_flops else float(costs.head_params)
    neuron_cost = costs.neuron_flops if use_flops else float(costs.neuron_params)
    heads, neurons = scores.heads, scores.neurons
    if not comparable:
        heads, neurons = _normalise(heads, head_cost), _normalise(neurons, neuron_cost)
    keep_h, keep_n = _protected(heads, budget.min_heads), _protected(neurons, budget.min_neurons)
    # ``fixed``: cost that no removal changes (the branch biases), part of the total all the same.
    total = head_cost * sum(len(h) for h in heads) + neuron_cost * sum(len(n) for n in neurons) + fixed
    remaining = (
        (1.0 - ratio) * total
        - fixed
        - head_cost * sum(map(len, keep_h))
        - neuron_cost * sum(map(len, keep_n))
    )
    if remaining < 0:
        raise UserError("the per-layer minimum of heads/neurons alone exceeds the budget; lower the minimum")
    free_h = sorted(
        ((float(h[j]), i, j) for i, h in enumerate(heads) for j in range(len(h)) if j not in keep_h[i]),
        reverse=True,
    )
    free_n = sorted(
        ((float(n[j]), i, j) for i, n in enumerate(neurons) for j in range(len(n)) if j not in keep_n[i]),
        reverse=True,
    )
    score_h = np.concatenate([[0.0], np.cumsum([s for s, _, _ in free_h])])
    score_n = np.concatenate([[0.0], np.cumsum([s for s, _, _ in free_n])])
    best, best_split = -np.inf, (0, 0)
    for nh in range(len(free_h) + 1):
        left = remaining - nh * head_cost
        if left < -1e-6:
            break
        nn = min(len(free_n), math.floor(left / neuron_cost + 1e-9))
        value = score_h[nh] + score_n[nn]
        if value > best:
            best, best_split = value, (nh, nn)
    nh, nn = best_split
    for _, i, j in free_h[:nh]:
        keep_h[i].add(j)
    for _, i, j in free_n[:nn]:
        keep_n[i].add(j)
    removed_h = [set(range(len(h))) - k for h, k in zip(heads, keep_h, strict=True)]
    removed_n = [set(range(len(n))) - k for n, k in zip(neurons, keep_n, strict=True)]
    return removed_h, removed_n


def select_plan(
    layout: EncoderLayout, scores: Scores, budget: Budget, seq_len: int = 128, comparable: bool = True
) -> list[LayerPlan]:
    """Which heads and neurons each layer keeps. ``comparable``: head and neuron scores share a
    scale (Fisher), else each kind is normalised before a global search."""
    costs = layer_costs(layout.hidden_size, layout.head_dim, seq_len)
    global_ratio = budget.flops if budget.flops is not None else budget.params
    if global_ratio is not None:
        use_flops = budget.flops is not None
        fixed = 0.0 if use_flops else float(2 * layout.hidden_size * len(layout.layers))
        removed_h, removed_n = _global_search(
            scores, costs, global_ratio, use_flops, budget, comparable, fixed
        )
    else:
        no_heads = [set[int]() for _ in layout.layers]
        removed_h = _remove_lowest(scores.heads, budget.heads, budget.min_heads) if budget.heads else no_heads
        no_neurons = [set[int]() for _ in layout.layers]
        removed_n = (
            _remove_lowest(scores.neurons, budget.ffn, budget.min_neurons) if budget.ffn else no_neurons
        )
    plan = []
    for layer, rh, rn in zip(layout.layers, removed_h, removed_n, strict=True):
        kept_h = tuple(h for h in range(layer.attention.num_heads) if h not in rh)
        kept_n = tuple(n for n in range(layer.ffn.size) if n not in rn)
        plan.append(LayerPlan(kept_h, kept_n))
    if all(not p.kept_heads and not p.kept_neurons for p in plan):
        raise UserError("the budget would remove every head and every neuron; ask for less")
    return plan
