"""Layer-wise reconstruction after pruning (the "mask tuning" step of Kwon et al. 2022).

For each layer in order, the output-projection rows of the kept heads and the down-projection
rows of the kept neurons are refitted by ridge least squares on calibration tokens, so that the
pruned model's residual sum after that block (``stream + branch``) matches the unpruned model's:

    min_W ||X W - (s_orig + P_orig - s_pruned)||^2 + lam ||W - W_0||^2

where ``X`` is the pruned block's input to the projection (its own, upstream errors included),
``s`` the residual stream and ``P`` the projection's output. The ridge term pulls towards the
current weights, so a well-conditioned fit changes little and a rank-poor one stays safe.
A column of ones in ``X`` refits the bias too (unpenalised): removed units' mean contribution
moves into it instead of being lost. Each step re-runs the partly refitted model, so later layers also correct earlier errors.
The relative error ``||X W - T|| / ||P_orig||`` is reported before and after each fit (in-sample).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from trimformer.errors import UserError
from trimformer.passes.base import CalibrationFeeds
from trimformer.passes.graph import EncoderLayout
from trimformer.passes.intermediates import iter_outputs, session_with_outputs
from trimformer.passes.prune.importance import token_mask
from trimformer.passes.prune.surgery import LayerPlan
from trimformer.progress import progress_bar

__all__ = ["ReconstructionStep", "ReconstructionUnit", "reconstruct", "reconstruction_units"]

logger = logging.getLogger(__name__)


@dataclass
class ReconstructionStep:
    layer: int
    block: str  # "attention" or "ffn" (ridge); "layer" (block reconstruction)
    relative_error_before: float
    relative_error_after: float
    tokens: int
    method: str = "ridge"  # or "gradient" (trimformer.training.block_reconstruct)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "block": self.block,
            "method": self.method,
            "relative_error_before": round(self.relative_error_before, 6),
            "relative_error_after": round(self.relative_error_after, 6),
            "tokens": self.tokens,
        }


@dataclass
class ReconstructionUnit:
    layer: int
    block: str
    inp: str  # the projection's input (context or activation)
    proj: str  # the projection MatMul's output
    skip: str  # the residual stream it joins
    group: int = 1  # rows per unit (head_dim for heads, 1 for neurons)
    first_token_only: bool = False


def _weight_of(model: onnx.ModelProto, proj: str) -> tuple[onnx.NodeProto, np.ndarray]:
    node = next(n for n in model.graph.node if proj in n.output)
    name = node.input[1]
    inits = {i.name: i for i in model.graph.initializer}
    for _ in range(8):
        if name in inits:
            return node, numpy_helper.to_array(inits[name])
        producer = next((n for n in model.graph.node if name in n.output), None)
        if producer is None or producer.op_type != "Identity":
            break
        name = producer.input[0]
    raise UserError(f"the weight of {node.name or proj} is not a constant; cannot reconstruct")


def _set_weight(model: onnx.ModelProto, node: onnx.NodeProto, weight: np.ndarray, step: int) -> None:
    name = f"{node.output[0]}_reconstructed_{step}"
    model.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), name))
    node.input[1] = name


def _bias_of(model: onnx.ModelProto, proj: str) -> tuple[onnx.NodeProto, int, np.ndarray] | None:
    """The bias ``Add`` right after a projection MatMul: (node, input slot, value), if constant."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Add" and proj in node.input:
            slot = 1 - list(node.input).index(proj)
            if node.input[slot] in inits:
                return node, slot, numpy_helper.to_array(inits[node.input[slot]])
    return None


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {i.name for i in model.graph.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _fit_scales(gram: np.ndarray, cross: np.ndarray, w0: np.ndarray, group: int, alpha: float) -> np.ndarray:
    """One scale per kept unit (Kwon et al.'s mask tuning): rows ``W = diag(m) W0``, ridge towards 1.

    With ``S`` the unit-membership matrix, the unit Gram is ``S (G * W0 W0^T) S^T`` and the
    right-hand side ``S rowsum(B * W0)``: the same accumulators as the full-row fit.
    """
    features = w0.shape[0]
    units = features // group
    member = np.zeros((units, features))
    member[np.arange(features) // group, np.arange(features)] = 1.0
    g_units = member @ (gram * (w0 @ w0.T)) @ member.T
    b_units = member @ (cross * w0).sum(axis=1)
    lam = alpha * max(float(np.trace(g_units)) / max(units, 1), 1e-12)
    scales = np.linalg.solve(g_units + lam * np.eye(units), b_units + lam)
    return w0 * (member.T @ scales)[:, None]


def reconstruction_units(layout: EncoderLayout, plan: list[LayerPlan]) -> list[ReconstructionUnit]:
    """The blocks to refit (those that keep at least one unit), by value names that survive surgery."""
    units = []
    for layer, step in zip(layout.layers, plan, strict=True):
        attn, ffn = layer.attention, layer.ffn
        blocks = (
            ("attention", step.kept_heads, attn.context, attn.out, attn.residual, attn.head_dim),
            ("ffn", step.kept_neurons, ffn.activation, ffn.down, ffn.residual, 1),
        )
        for block, kept, inp, projection, residual, group in blocks:
            if kept:
                proj = str(projection.matmul.outputs[0].name)
                units.append(
                    ReconstructionUnit(
                        layer.index, block, str(inp.name), proj, str(residual.skip.name), group
                    )
                )
    return units


def _tokens_of(unit: ReconstructionUnit, feeds: dict[str, np.ndarray], value: np.ndarray) -> np.ndarray:
    """Which (batch, seq) positions of ``value`` the unit is fitted on."""
    mask = token_mask(feeds, value.shape[0], value.shape[1])
    if unit.first_token_only:
        mask[:, 1:] = False
    return mask


def _targets(
    original: onnx.ModelProto, units: list[ReconstructionUnit], calibration: Callable[[], CalibrationFeeds]
) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Per unit and batch, the unpruned model's residual sum (stream + branch) on the fitted
    tokens; and per unit the squared norm of the unpruned branch (the error's scale)."""
    names = sorted({n for u in units for n in (u.proj, u.skip)})
    session = session_with_outputs(original, names, only=True)
    targets: list[list[np.ndarray]] = [[] for _ in units]
    branch_norm = np.zeros(len(units))
    for feeds, values in iter_outputs(session, names, calibration):
        for i, unit in enumerate(units):
            proj = values[unit.proj]
            mask = _tokens_of(unit, feeds, proj)
            targets[i].append((values[unit.skip][mask] + proj[mask]).astype(np.float32))
            branch_norm[i] += float((proj[mask].astype(np.float64) ** 2).sum())
    return targets, branch_norm


@dataclass
class _NormalEquations:
    """Sums over the calibration tokens for ``min ||X W - T||``: ``X^T X``, ``X^T T``, ``||T||^2``."""

    gram: np.ndarray
    cross: np.ndarray
    t_sq: float = 0.0
    count: int = 0

    def residual(self, w: np.ndarray) -> float:
        """``||X W - T||^2`` from the sums alone."""
        return max(float(np.sum(w * (self.gram @ w)) - 2 * np.sum(w * self.cross) + self.t_sq), 0.0)


def _normal_equations(
    model: onnx.ModelProto,
    unit: ReconstructionUnit,
    targets: list[np.ndarray],
    calibration: Callable[[], CalibrationFeeds],
    shape: tuple[int, ...],
    with_bias: bool,
) -> _NormalEquations:
    """Accumulate the fit's sums by running the partly refitted ``model`` (upstream errors included);
    ``with_bias`` adds a column of ones to ``X`` so the bias is refitted too."""
    session = session_with_outputs(model, [unit.inp, unit.skip], only=True)
    width = shape[0] + with_bias
    sums = _NormalEquations(np.zeros((width, width)), np.zeros((width, shape[1])))
    for batch, (feeds, values) in enumerate(iter_outputs(session, [unit.inp, unit.skip], calibration)):
        mask = _tokens_of(unit, feeds, values[unit.inp])
        x32 = values[unit.inp][mask]
        if batch >= len(targets) or targets[batch].shape[0] != x32.shape[0]:
            raise UserError(
                "calibration data differs between runs; reconstruction needs a deterministic source"
            )
        t32 = targets[batch] - values[unit.skip][mask]
        if with_bias:
            x32 = np.concatenate([x32, np.ones((x32.shape[0], 1), dtype=x32.dtype)], axis=1)
        # Products in float32 (BLAS speed), sums across batches in float64.
        sums.gram += x32.T @ x32
        sums.cross += x32.T @ t32
        sums.t_sq += float((t32.astype(np.float64) ** 2).sum())
        sums.count += x32.shape[0]
    return sums


def _fit_rows(sums: _NormalEquations, w0: np.ndarray, features: int, alpha: float) -> np.ndarray:
    """Ridge least squares towards the current rows; the bias row (if any) is not penalised."""
    lam = alpha * max(float(np.trace(sums.gram[:features, :features])) / max(features, 1), 1e-12)
    penalty = np.full(w0.shape[0], lam)
    penalty[features:] = 0.0  # the bias shift is not pulled towards zero
    return np.linalg.solve(sums.gram + np.diag(penalty), sums.cross + penalty[:, None] * w0)


def _set_bias(
    model: onnx.ModelProto, bias: tuple[onnx.NodeProto, int, np.ndarray], shift: np.ndarray, step: int
) -> None:
    add, slot, value = bias
    name = f"{add.output[0]}_reconstructed_{step}"
    shifted = (value.astype(np.float64) + shift).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(shifted, name))
    add.input[slot] = name


def _refit_unit(
    model: onnx.ModelProto,
    index: int,
    unit: ReconstructionUnit,
    targets: list[np.ndarray],
    branch_norm: float,
    calibration: Callable[[], CalibrationFeeds],
    alpha: float,
    mode: str,
    intercept: bool,
) -> ReconstructionStep:
    """Refit one unit's projection in ``model`` in place, unless that would not lower its error."""
    node, weight = _weight_of(model, unit.proj)
    features = weight.shape[0]
    bias = _bias_of(model, unit.proj) if intercept and mode == "rows" else None
    sums = _normal_equations(model, unit, targets, calibration, weight.shape, bias is not None)
    w0 = weight.astype(np.float64)
    if bias is not None:
        w0 = np.concatenate([w0, np.zeros((1, w0.shape[1]))])
    if mode == "scales":
        fitted = _fit_scales(sums.gram, sums.cross, w0, unit.group, alpha)
    else:
        fitted = _fit_rows(sums, w0, features, alpha)
    scale = max(branch_norm, 1e-30)
    before = float(np.sqrt(sums.residual(w0) / scale))
    after = float(np.sqrt(sums.residual(fitted) / scale))
    if after <= before:
        _set_weight(model, node, fitted[:features], index)
        if bias is not None:
            _set_bias(model, bias, fitted[features], index)
    else:  # never make a block worse than plain removal
        after = before
    logger.debug("layer %d %s: relative error %.4f -> %.4f", unit.layer, unit.block, before, after)
    return ReconstructionStep(unit.layer, unit.block, before, after, sums.count)


def reconstruct(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    units: list[ReconstructionUnit],
    calibration: Callable[[], CalibrationFeeds],
    alpha: float = 1e-2,
    mode: str = "rows",
    intercept: bool = True,
) -> tuple[onnx.ModelProto, list[ReconstructionStep]]:
    """Refit the kept projection rows of ``pruned`` (a copy is returned) layer by layer.

    ``units`` come from :func:`reconstruction_units` on the layout found before the surgery.
    Each unit is fitted on the model with the earlier units already refitted, so later layers
    also correct earlier errors.
    """
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    targets, branch_norm = _targets(original, units, calibration)
    steps: list[ReconstructionStep] = []
    with progress_bar("reconstruction", len(units)) as bar:
        for i, unit in enumerate(units):
            steps.append(
                _refit_unit(model, i, unit, targets[i], branch_norm[i], calibration, alpha, mode, intercept)
            )
            bar.advance(bar.task_ids[0])
    _drop_unused_initializers(model)
    return model, steps
