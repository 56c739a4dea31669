"""Accuracy-aware quantization: return the most sensitive nodes to float until the accuracy drop
fits the budget.

Nodes are ranked by isolated sensitivity (sensitivity.py); the fewest returned to float is found
by doubling, then bisection: about 2 log2(n) evaluations instead of n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from trimformer.errors import GateFailed, UserError
from trimformer.passes.quantize.graph import Candidate
from trimformer.passes.quantize.presets import QuantizerSettings
from trimformer.passes.quantize.quantizer import quantize_model
from trimformer.passes.quantize.sensitivity import node_sensitivity

__all__ = ["Attempt", "fewest_float_nodes", "fit_accuracy_budget"]


@dataclass(frozen=True)
class Attempt:
    float_nodes: int
    model: onnx.ModelProto
    drop: float  # accuracy points lost against the float model


def fewest_float_nodes(count: int, attempt: Callable[[int], Attempt], budget: float) -> Attempt:
    """The attempt with the fewest of ``count`` nodes in float whose drop fits ``budget``, or the
    all-float attempt when none fits. Assumes the drop shrinks as nodes return to float."""
    low, k = 0, 1
    while True:
        k = min(k, count)
        best = attempt(k)
        if best.drop <= budget:
            break
        if k == count:
            return best
        low, k = k, k * 2
    high = best.float_nodes
    while high - low > 1:
        mid = (low + high) // 2
        trial = attempt(mid)
        if trial.drop <= budget:
            best, high = trial, mid
        else:
            low = mid
    return best


@dataclass
class _Evaluations:
    """Scores candidates against the float model's accuracy and records every try for the report."""

    evaluate: Callable[[onnx.ModelProto], float]
    base: float
    tried: list[dict[str, Any]]

    def drop(self, model: onnx.ModelProto, float_nodes: int) -> float:
        score = self.evaluate(model)
        drop = round((self.base - score) * 100.0, 4)
        self.tried.append({"float_nodes": float_nodes, "accuracy": round(score, 5), "drop_points": drop})
        return drop


def fit_accuracy_budget(
    float_model: onnx.ModelProto,
    typed: onnx.ModelProto,
    quantized: onnx.ModelProto,
    chosen: list[Candidate],
    ranges: Any,
    settings: QuantizerSettings,
    dynamic: bool,
    budget: float,
    evaluate: Callable[[onnx.ModelProto], float] | None,
    feeds: list[dict[str, np.ndarray]],
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``quantized`` if it fits the budget, else the typed float graph with the fewest most
    sensitive ``chosen`` nodes returned to float; and the report's ``accuracy_aware`` section.
    :class:`GateFailed` when even the all-float graph misses the budget."""
    if evaluate is None:
        raise UserError("--max-accuracy-drop needs an evaluation set; pass --eval DATA")
    runs = _Evaluations(evaluate, evaluate(float_model), [])
    report: dict[str, Any] = {
        "float_accuracy": round(runs.base, 5),
        "budget_points": budget,
        "tried": runs.tried,
    }
    drop = runs.drop(quantized, 0)
    if drop <= budget:
        report.update(returned_to_float=[], final_drop_points=drop)
        return quantized, report
    sensitivity = node_sensitivity(typed, chosen, ranges, feeds, settings)
    order = sorted((c.name for c in chosen), key=lambda n: -sensitivity[n])
    report["sensitivity"] = {n: round(sensitivity[n], 5) for n in order}

    def attempt(k: int) -> Attempt:
        keep = [c.name for c in chosen if c.name not in set(order[:k])]
        # With every node float the candidate is the fused float graph.
        model = typed if not keep else quantize_model(typed, ranges, settings, keep, dynamic)[0]
        return Attempt(k, model, runs.drop(model, k))

    best = fewest_float_nodes(len(order), attempt, budget)
    if best.drop > budget:
        raise GateFailed(
            f"accuracy budget of {budget:g} points cannot be met: the drop is still {best.drop:.2f} points "
            f"with every one of the {len(order)} quantizable nodes in float; nothing was written"
        )
    ops = {c.name: c.op_type for c in chosen}
    report["returned_to_float"] = [
        {
            "node": n,
            "op": ops[n],
            "sensitivity": round(sensitivity[n], 5),
            "reason": f"sensitivity rank {i + 1} of {len(order)}; returned to float to fit the {budget:g}-point budget",
        }
        for i, n in enumerate(order[: best.float_nodes])
    ]
    report["final_drop_points"] = best.drop
    return best.model, report
