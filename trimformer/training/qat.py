"""Quantization-aware training (QAT): int8 fake-quantization of the student during distillation.

The student's encoder Linear layers compute with the values the static int8 graph will use:

* weights: per-channel (per output unit) symmetric int8, scale ``absmax / 127`` computed in float64
  and stored in float32, values ``round(w / scale)`` clipped to [-128, 127] - what onnxruntime's
  quantizer writes for ``cpu-vnni`` (``quant_utils.compute_scale_zp`` / ``quantize_nparray``);
* inputs: per-tensor asymmetric uint8 with a range ``[lo, hi]`` observed during training (EMA of
  each batch's min and max) or learned (``lo`` and ``hi`` as parameters, gradients through the
  rounding by the straight-through estimator); scale and zero point from the range exactly as
  onnxruntime computes them from calibrated ranges. Q, K and V read one tensor, which the fused
  ``QAttention`` quantizes once: their three Linears share one input quantizer.
* embeddings: ``QEmbedLayerNormalization`` stores the word, position and segment tables and the
  embedding LayerNorm's gamma and beta as per-tensor asymmetric uint8; they are fake-quantized the
  same way (a frozen table is quantized once and cached).

The pooler, the classifier, attention scores, softmax, LayerNorm and GELU stay float, as the
quantize pass leaves them. Gradients pass the rounding unchanged (straight-through estimator).

:func:`qat_hooks` gives the distillation loop its hooks: wrap the student before the optimizer is
built, turn fake-quantization on for the last ``qat_steps`` steps only (0: all steps; the ranges
are observed from the first step so they are warm when it starts), keep best weights only from
fake-quantized evaluations, unwrap before saving and write ``qat_ranges.json`` next to the weights.
``trimformer export`` copies that file into the artifact and ``trimformer quantize
--ranges-from-training`` builds its Q/DQ scales from it (:mod:`trimformer.formats.qat_ranges` is the file).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trimformer.errors import UserError
from trimformer.formats.qat_ranges import QAT_RANGES_FILE, RANGES_FORMAT, read_training_ranges, weight_digest
from trimformer.training.distill.students import layer_list
from trimformer.training.distill.trainer import TrainerHooks

__all__ = [
    "QAT_RANGES_FILE",
    "RANGE_MODES",
    "ActivationQuantizer",
    "QATConfig",
    "QATEmbedding",
    "QATLayerNorm",
    "QATLinear",
    "activation_qparams",
    "apply_qat",
    "collect_ranges",
    "fake_quant_activation",
    "fake_quant_table",
    "fake_quant_weight",
    "load_fake_quant_student",
    "qat_hooks",
    "quantizers",
    "remove_qat",
    "set_fake_quant",
    "weight_qparams",
    "write_ranges",
]

logger = logging.getLogger(__name__)

RANGE_MODES = ("ema", "learned")
_QMAX_U8 = 255.0
_TINY = float(np.finfo(np.float32).tiny)
# Sibling Linears that read the same tensor (one QAttention input): BERT/RoBERTa, DistilBERT.
_SHARED_INPUTS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


# -- the arithmetic, matched to onnxruntime -------------------------------------------------------
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (numpy's and MLAS's rounding) with an identity gradient."""
    return torch.round(x).detach() + (x - x.detach())


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 asymmetric (scale float32, zero point as a float tensor) of a range, as
    ``compute_scale_zp(rmin, rmax, 0, 255)``: the range is widened to hold 0, the scale computed in
    float64 and stored in float32, the zero point ``round(-rmin / scale64)``. Differentiable in
    ``lo``/``hi`` through the straight-through rounding."""
    lo32 = torch.clamp(lo.float(), max=0.0)
    hi32 = torch.clamp(hi.float(), min=0.0)
    scale64 = (hi32.double() - lo32.double()) / _QMAX_U8
    if float(scale64.detach()) < _TINY:
        one = torch.ones((), dtype=torch.float32, device=lo.device)
        return one, torch.zeros((), dtype=torch.float32, device=lo.device)
    zero_point = _round_ste(-lo32.double() / scale64).float()
    return scale64.float(), zero_point


def fake_quant_activation(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear(uint8) then DequantizeLinear with the range's scale and zero point:
    ``q = clip(round(x / s) + z, 0, 255)``, ``(q - z) * s``."""
    scale, zero_point = activation_qparams(lo, hi)
    q = torch.clamp(_round_ste(x / scale) + zero_point, 0.0, _QMAX_U8)
    return (q - zero_point) * scale


def weight_qparams(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 scales of a ``[out, in]`` Linear weight (float32), as
    onnxruntime's per-channel weight quantization computes them (qmin/qmax -127/127)."""
    w = weight.detach().float()
    absmax = torch.maximum(w.amax(dim=1).clamp(min=0.0).abs(), w.amin(dim=1).clamp(max=0.0).abs())
    scale64 = (absmax.double() - (-absmax).double()) / 254.0
    scale64 = torch.where(scale64 < _TINY, torch.ones_like(scale64), scale64)
    return scale64.float()


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """``round(w / s)`` clipped to [-128, 127], times ``s``, per output channel; identity gradient."""
    scale = weight_qparams(weight).unsqueeze(1)
    q = torch.clamp(torch.round(weight.detach().float() / scale), -128.0, 127.0)
    # ``dq + (w - w.detach())``: exactly the dequantized values, with the gradient of ``w``.
    return (q * scale).to(weight.dtype) + (weight - weight.detach())


def fake_quant_table(table: torch.Tensor) -> torch.Tensor:
    """A whole tensor as uint8 asymmetric from its own min and max (how onnxruntime stores the
    tables and LayerNorm parameters of ``QEmbedLayerNormalization``); identity gradient."""
    data = table.detach().float()
    scale, zero_point = activation_qparams(data.min(), data.max())
    q = torch.clamp(torch.round(data / scale) + zero_point, 0.0, _QMAX_U8)
    return ((q - zero_point) * scale).to(table.dtype) + (table - table.detach())


# -- modules -----------------------------------------------------------------------------------
class ActivationQuantizer(nn.Module):
    """Per-tensor uint8 fake-quantization of a Linear's input.

    ``ema``: ``lo``/``hi`` are buffers following each training batch's min and max (moving
    average); ``learned``: they are parameters, initialised from the observed range and trained
    through the straight-through estimator once fake-quantization is on; ``fixed``: the ranges of
    a finished run (evaluation and parity checks). ``enabled`` is a buffer, so a checkpoint
    resumes in the right phase.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    initialized: torch.Tensor
    enabled: torch.Tensor

    def __init__(self, mode: str = "ema", momentum: float = 0.01) -> None:
        super().__init__()
        self.mode = mode
        self.momentum = momentum
        if mode == "learned":
            self.lo = nn.Parameter(torch.zeros(()))
            self.hi = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("lo", torch.zeros(()))
            self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        low, high = x.detach().float().aminmax()
        if not bool(self.initialized):
            self.lo.copy_(low)
            self.hi.copy_(high)
            self.initialized.fill_(True)
        else:
            self.lo.mul_(1.0 - self.momentum).add_(low * self.momentum)
            self.hi.mul_(1.0 - self.momentum).add_(high * self.momentum)

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        on = bool(self.enabled)
        if self.training and observe and self.mode != "fixed" and (self.mode == "ema" or not on):
            self.observe(x)
        if not on:
            if self.mode == "learned":
                # The range parameters take part (with weight 0) so DistributedDataParallel sees them used.
                return x + 0.0 * (self.lo + self.hi)
            return x
        return fake_quant_activation(x, self.lo, self.hi)

    def qparams(self) -> tuple[float, float, float, int]:
        """(lo, hi, scale, zero point) as written to the ranges file."""
        lo = self.lo.detach().float().cpu()
        hi = self.hi.detach().float().cpu()
        scale, zero_point = activation_qparams(lo, hi)
        return float(lo), float(hi), float(scale), int(zero_point)

    def extra_repr(self) -> str:
        lo, hi = self.lo.detach().item(), self.hi.detach().item()
        return f"mode={self.mode}, lo={lo:.4g}, hi={hi:.4g}, enabled={bool(self.enabled)}"


class QATLinear(nn.Module):
    """A Linear computing with int8-simulated weights and a fake-quantized input.

    ``observe`` is False for K and V, which share Q's quantizer: the shared range is updated once
    per forward pass."""

    def __init__(self, linear: nn.Linear, quantizer: ActivationQuantizer, observe: bool = True) -> None:
        super().__init__()
        self.linear = linear
        self.input_quantizer = quantizer
        self.observe = observe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight
        if bool(self.input_quantizer.enabled):
            weight = fake_quant_weight(weight)
        return F.linear(self.input_quantizer(x, observe=self.observe), weight, self.linear.bias)


class _TableCache:
    """Fake-quantized copy of a frozen parameter, recomputed only when the parameter changes."""

    def __init__(self) -> None:
        self.key: tuple[int, int, torch.device] | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, param: torch.Tensor) -> torch.Tensor:
        if param.requires_grad and torch.is_grad_enabled():
            return fake_quant_table(param)
        key = (param.data_ptr(), param._version, param.device)
        if key != self.key or self.value is None:
            self.key, self.value = key, fake_quant_table(param).detach()
        return self.value


class QATEmbedding(nn.Module):
    """An embedding table read through its uint8 fake-quantized values."""

    def __init__(self, embedding: nn.Embedding, switch: ActivationQuantizer) -> None:
        super().__init__()
        self.embedding = embedding
        # The quantizer whose ``enabled`` says whether to simulate; kept out of the module tree.
        self._switch = [switch]
        self._cache = _TableCache()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        weight = self._cache(e.weight) if bool(self._switch[0].enabled) else e.weight
        return F.embedding(
            ids, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse
        )


class QATLayerNorm(nn.Module):
    """The embedding LayerNorm with uint8 fake-quantized gamma and beta."""

    def __init__(self, norm: nn.LayerNorm, switch: ActivationQuantizer) -> None:
        super().__init__()
        self.norm = norm
        self._switch = [switch]
        self._caches = (_TableCache(), _TableCache())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        weight: torch.Tensor | None = n.weight
        bias: torch.Tensor | None = n.bias
        if bool(self._switch[0].enabled) and weight is not None and bias is not None:
            weight, bias = self._caches[0](weight), self._caches[1](bias)
        return F.layer_norm(x, n.normalized_shape, weight, bias, n.eps)


# -- wrapping and unwrapping -------------------------------------------------------------------------
def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _embeddings(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if name.endswith("embeddings") and isinstance(getattr(module, "word_embeddings", None), nn.Embedding):
            return name, module
    return None


def _qkv_groups(layers: nn.Module, prefix: str) -> dict[str, str]:
    """Linear path -> path of the first Linear of its Q/K/V group (which owns the quantizer)."""
    owner: dict[str, str] = {}
    for name, module in layers.named_modules():
        for group in _SHARED_INPUTS:
            if all(isinstance(getattr(module, g, None), nn.Linear) for g in group):
                base = f"{prefix}.{name}" if name else prefix
                for g in group:
                    owner[f"{base}.{g}"] = f"{base}.{group[0]}"
    return owner


def apply_qat(
    model: nn.Module,
    mode: str = "ema",
    embeddings: bool = True,
    ranges: dict[str, Any] | None = None,
) -> list[str]:
    """Swap the encoder's Linears (and the embedding tables) for fake-quantized ones, in place;
    returns the wrapped Linear paths. With ``ranges`` (a ranges file's content) the quantizers are
    fixed to its ranges and on."""
    if any(isinstance(m, QATLinear) for m in model.modules()):
        raise ValueError("the model is already wrapped for QAT")
    prefix, layers = layer_list(model, "--qat supports BERT-family models")
    owner = _qkv_groups(layers, prefix)
    by_module = {r["module"]: r for r in ranges["linears"]} if ranges is not None else {}
    by_owner: dict[str, ActivationQuantizer] = {}
    paths = [
        f"{prefix}.{name}"
        for name, module in layers.named_modules()
        if name and isinstance(module, nn.Linear)
    ]
    if ranges is not None:
        missing = sorted(set(by_module) ^ set(paths))
        if missing:
            raise UserError(
                f"the training ranges do not match this model's Linear layers (e.g. {missing[0]!r}); "
                "use the ranges file written with this student"
            )
    for path in paths:
        linear = model.get_submodule(path)
        assert isinstance(linear, nn.Linear)
        key = owner.get(path, path)
        quantizer = by_owner.get(key)
        if quantizer is None:
            quantizer = by_owner[key] = ActivationQuantizer("fixed" if ranges is not None else mode)
            if ranges is not None:
                record = by_module[key]
                quantizer.lo.data.fill_(float(np.float32(record["lowest"])))
                quantizer.hi.data.fill_(float(np.float32(record["highest"])))
                quantizer.initialized.fill_(True)
                quantizer.enabled.fill_(True)
            quantizer.to(linear.weight.device)
        _set(model, path, QATLinear(linear, quantizer, observe=key == path))
    if ranges is not None:
        embeddings = bool(ranges.get("embeddings", {}).get("simulated", False))
    if embeddings:
        found = _embeddings(model)
        if found is not None and by_owner:
            emb = found[1]
            switch = next(iter(by_owner.values()))  # tables follow the same on/off phase
            for attr in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
                table = getattr(emb, attr, None)
                if isinstance(table, nn.Embedding):
                    setattr(emb, attr, QATEmbedding(table, switch))
            norm = getattr(emb, "LayerNorm", None)
            if isinstance(norm, nn.LayerNorm):
                emb.LayerNorm = QATLayerNorm(norm, switch)
        else:
            embeddings = False
    model._trimformer_qat_embeddings = embeddings  # type: ignore[assignment]
    return paths


def _wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear | QATEmbedding | QATLayerNorm):
            yield name, module


def quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Each input quantizer once (Q/K/V share one)."""
    seen: dict[int, ActivationQuantizer] = {}
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            seen.setdefault(id(module), module)
    return list(seen.values())


def set_fake_quant(model: nn.Module, on: bool) -> None:
    for q in quantizers(model):
        q.enabled.fill_(on)


def collect_ranges(model: nn.Module, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ranges file's content for a wrapped model: one entry per Linear with its input range,
    the scale and zero point it implies, its quantizer (shared by Q/K/V) and a digest of its
    weight as the ONNX graph stores it (``[in, out]``), by which the quantize pass finds it."""
    names: dict[int, str] = {}
    linears = []
    for path, module in _wrappers(model):
        if not isinstance(module, QATLinear):
            continue
        q = module.input_quantizer
        names.setdefault(id(q), path)
        lo, hi, scale, zero_point = q.qparams()
        weight = module.linear.weight.detach().float().cpu().numpy()
        linears.append(
            {
                "module": path,
                "in_features": int(weight.shape[1]),
                "out_features": int(weight.shape[0]),
                "quantizer": names[id(q)],
                "lowest": lo,
                "highest": hi,
                "scale": scale,
                "zero_point": zero_point,
                "weight_sha256": weight_digest(np.ascontiguousarray(weight.T)),
            }
        )
    simulated = bool(getattr(model, "_trimformer_qat_embeddings", False))
    return {
        "format": RANGES_FORMAT,
        "activations": {"type": "uint8", "symmetric": False, "granularity": "per-tensor"},
        "weights": {"type": "int8", "symmetric": True, "per_channel": True, "reduce_range": False},
        "embeddings": {
            "simulated": simulated,
            "type": "uint8" if simulated else None,
            "note": "word/position/segment tables and LayerNorm gamma/beta, per-tensor asymmetric",
        },
        "float": [
            "pooler",
            "classifier",
            "attention scores and softmax",
            "LayerNorm",
            "GELU",
            "residual adds",
        ],
        **(meta or {}),
        "linears": linears,
    }


def remove_qat(model: nn.Module) -> nn.Module:
    """Put the plain modules back (the float weights are what the quantizer re-quantizes)."""
    for path, module in sorted(_wrappers(model), key=lambda item: -item[0].count(".")):
        if isinstance(module, QATLinear):
            _set(model, path, module.linear)
        elif isinstance(module, QATEmbedding):
            _set(model, path, module.embedding)
        elif isinstance(module, QATLayerNorm):
            _set(model, path, module.norm)
    if hasattr(model, "_trimformer_qat_embeddings"):
        del model._trimformer_qat_embeddings
    return model


def write_ranges(folder: Path, ranges: dict[str, Any]) -> Path:
    path = folder / QAT_RANGES_FILE
    path.write_text(json.dumps(ranges, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


# -- hooks for the distillation loop ------------------------------------------------------------
@dataclass
class QATConfig:
    steps: int  # the run's total optimizer steps
    qat_steps: int = 0  # fake-quantize only the last N steps; 0 = all
    mode: str = "ema"
    embeddings: bool = True
    ranges: dict[str, Any] = field(default_factory=dict)

    @property
    def start(self) -> int:
        """The first step that trains fake-quantized."""
        if self.qat_steps <= 0 or self.qat_steps >= self.steps:
            return 1
        return self.steps - self.qat_steps + 1


def qat_hooks(config: QATConfig) -> TrainerHooks:
    """Hooks that make a distillation quantization-aware (see the module docstring)."""
    if config.mode not in RANGE_MODES:
        raise UserError(f"--qat-ranges must be one of {', '.join(RANGE_MODES)}, got {config.mode!r}")

    model_ref: list[nn.Module] = []

    def wrap(model: nn.Module) -> None:
        count = len(apply_qat(model, config.mode, config.embeddings))
        set_fake_quant(model, config.start <= 1)
        model_ref.append(model)
        logger.info(
            "QAT: %d Linear layers fake-quantized from step %d (%s ranges)", count, config.start, config.mode
        )

    def on_step(step: int, info: dict[str, float]) -> None:
        # Step ``start`` is the first to train fake-quantized (a resumed run has the flag in its state).
        if step + 1 == config.start and model_ref:
            set_fake_quant(model_ref[0], True)
            logger.info("QAT: fake-quantization on from step %d", config.start)

    def before_save(model: nn.Module) -> nn.Module:
        on = all(bool(q.enabled) for q in quantizers(model))
        if not on:
            logger.warning("QAT: the kept weights were trained before fake-quantization started")
        config.ranges = collect_ranges(
            model,
            {
                "range_mode": config.mode,
                "fake_quant_from_step": config.start,
                "steps": config.steps,
                "trained_fake_quantized": on,
            },
        )
        return remove_qat(model)

    def write_files(folder: Path) -> None:
        if config.ranges:
            write_ranges(folder, config.ranges)

    return TrainerHooks(
        wrap_student=wrap,
        on_step=on_step,
        before_save=before_save,
        keep_best=lambda step: step >= config.start,
        write_files=write_files,
    )


def load_fake_quant_student(folder: str | Path) -> Any:
    """A distilled QAT student (model folder with ``qat_ranges.json``) as the fake-quantized
    PyTorch model it was trained as, in eval mode: the reference the int8 graph is checked against."""
    from trimformer.sources import load_source

    folder = Path(folder)
    path = folder / QAT_RANGES_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {QAT_RANGES_FILE}; it was not distilled with --qat")
    ranges = read_training_ranges(path)
    source = load_source(folder)
    apply_qat(source.model, ranges=ranges)
    for module in _wrappers(source.model):
        wrapped = module[1]
        if isinstance(wrapped, QATLinear):
            digest = weight_digest(np.ascontiguousarray(wrapped.linear.weight.detach().float().numpy().T))
            record = next(r for r in ranges["linears"] if r["module"] == module[0])
            if digest != record["weight_sha256"]:
                raise UserError(
                    f"{path} does not belong to these weights ({module[0]} differs); use the student it was written with"
                )
    return source.eval()
