"""Per-node quantization sensitivity: the error of a node's output when only it is quantized.

For each candidate the float model is run once on calibration batches with the node's input
captured; the node's product is then computed twice in numpy, in float and with its input and
weight rounded the way the quantizer will round them (the calibrated activation scale and zero
point, per-channel weight scales). The relative error of that product is the node's isolated
sensitivity: it does not mix in the errors of earlier quantized nodes, and costs one float run
instead of one quantize-and-evaluate per node.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

from trimformer.passes.intermediates import session_with_outputs
from trimformer.passes.quantize.graph import Candidate
from trimformer.passes.quantize.presets import QuantizerSettings

__all__ = ["capture_inputs", "node_sensitivity"]

logger = logging.getLogger(__name__)


def _act_qparams(
    rmin: float, rmax: float, signed: bool, symmetric: bool
) -> tuple[float, float, float, float]:
    """(scale, zero_point, qmin, qmax) the way onnxruntime computes them."""
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    qmin, qmax = (-128.0, 127.0) if signed else (0.0, 255.0)
    if symmetric:
        absmax = max(abs(rmin), abs(rmax))
        rmin, rmax = -absmax, absmax
        if signed:
            qmin = -127.0
    scale = (rmax - rmin) / (qmax - qmin) if rmax > rmin else 1.0
    zero = round(qmin - rmin / scale)
    return scale, float(np.clip(zero, qmin, qmax)), qmin, qmax


def _fake_quant_act(x: np.ndarray, rng: tuple[float, float], signed: bool, symmetric: bool) -> np.ndarray:
    scale, zero, qmin, qmax = _act_qparams(rng[0], rng[1], signed, symmetric)
    return ((np.clip(np.round(x / scale) + zero, qmin, qmax) - zero) * scale).astype(np.float32)


def _fake_quant_weight(w: np.ndarray, per_channel: bool, reduce_range: bool) -> np.ndarray:
    qmax = 63.0 if reduce_range else 127.0
    absmax = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(np.float32)


def _fake_quant_table(w: np.ndarray) -> np.ndarray:
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = round(-lo / scale)
    return ((np.clip(np.round(w / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def capture_inputs(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, list[np.ndarray]]:
    """Run the float model with ``names`` added as outputs; returns each tensor per batch."""
    session = session_with_outputs(model, names)
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        values = session.run(names, feed)
        for name, value in zip(names, values, strict=True):
            out[name].append(np.asarray(value, dtype=np.float32))
    return out


def node_sensitivity(
    model: onnx.ModelProto,
    candidates: list[Candidate],
    ranges: Any,
    feeds: list[dict[str, np.ndarray]],
    settings: QuantizerSettings,
) -> dict[str, float]:
    """Relative L2 error of each candidate's product when only it is quantized as ``settings`` say."""
    signed = settings.activation_type == "int8"
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    acts = sorted({c.activation for c in candidates if c.activation})
    captured = capture_inputs(model, acts, feeds) if acts else {}
    errors: dict[str, float] = {}
    for cand in candidates:
        w = weights[cand.weight].astype(np.float32)
        if cand.activation is None:
            wq = _fake_quant_table(w)
            errors[cand.name] = float(np.linalg.norm(wq - w)) / max(float(np.linalg.norm(w)), 1e-12)
            continue
        if cand.activation not in ranges:
            errors[cand.name] = float("inf")
            continue
        lo, hi = ranges[cand.activation].range_value
        rmin, rmax = float(np.min(lo)), float(np.max(hi))
        reduce_range = settings.reduce_range and cand.op_type != "EmbedLayerNormalization"
        wq = _fake_quant_weight(w, settings.per_channel, reduce_range)
        num = den = 0.0
        for x in captured[cand.activation]:
            flat = x.reshape(-1, x.shape[-1])
            ref = flat @ w
            got = _fake_quant_act(flat, (rmin, rmax), signed, settings.symmetric_activations) @ wq
            num += float(np.sum((got - ref) ** 2))
            den += float(np.sum(ref**2))
        errors[cand.name] = float(np.sqrt(num / max(den, 1e-30)))
    return errors
