"""The ``quantize`` pass: static int8 with onnxruntime's calibrators and quantizers.

Order of work (each step measured; see docs/QUANTIZATION.md):

1. fuse first (``fuse`` pass machinery) unless the graph already has fused Attention, so the int8
   model keeps the Attention / SkipLayerNormalization / BiasGelu kernels;
2. type every tensor (onnxruntime's symbolic shape inference, contrib ops included);
3. calibrate the inputs of the chosen nodes, one batch at a time (flat memory), or reuse a cache;
4. quantize with onnxruntime's quantizer: ``qoperator`` = its IntegerOps operators driven by
   constant calibrated scales (QAttention, MatMulInteger rewritten to MatMulIntegerToFloat,
   QEmbedLayerNormalization); ``qdq`` = its QDQ quantizer with MatMul outputs left float;
5. accuracy-aware mode: rank the quantized nodes by isolated sensitivity and return the worst to
   float until the accuracy drop fits the budget (:class:`GateFailed` if it never does).

``dynamic=True`` runs onnxruntime's dynamic quantization on the fused graph instead, for comparison.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass
from pydantic import Field

from trimformer.errors import GateFailed, UserError
from trimformer.passes.base import PassConfig, PassContext, PassReport, register_pass
from trimformer.passes.fuse.cpu_kernels import prefer_cpu_kernels
from trimformer.passes.fuse.fusion import FuseConfig, fuse_proto
from trimformer.passes.quantize.calibrate import calibrate, infer_types, load_ranges, save_ranges
from trimformer.passes.quantize.graph import (
    Candidate,
    float_op_summary,
    fuse_matmul_integer_to_float,
    name_nodes,
    quantizable_nodes,
    quantized_ops,
)
from trimformer.passes.quantize.presets import (
    FORMATS,
    METHODS,
    PRESETS,
    QuantPreset,
    check_choice,
    get_preset,
)
from trimformer.passes.quantize.sensitivity import node_sensitivity
from trimformer.passes.quantize.smooth import ABSMAX_SUFFIX, channel_absmax, insert_smoothing
from trimformer.passes.quantize.training_ranges import (
    QAT_RANGES_FILE,
    check_training_options,
    check_training_settings,
    training_ranges,
)

__all__ = ["RANGES_FILE", "QuantizeConfig", "QuantizePass", "quantize_model"]

logger = logging.getLogger(__name__)

RANGES_FILE = "calibration_ranges.json"


class QuantizeConfig(PassConfig):
    preset: str = "cpu-vnni"
    method: str = "minmax"
    # None: the preset's.
    format: str | None = None
    per_channel: bool | None = None
    reduce_range: bool | None = None
    samples: int = 512
    percentile: float = 99.999
    # Node names to keep in float whatever the policy says.
    exclude: list[str] = Field(default_factory=list)
    fuse: bool = True
    num_heads: int = 0
    hidden_size: int = 0
    # Accuracy-aware mode: largest accepted drop, in accuracy points, against the float model.
    max_accuracy_drop: float | None = None
    dynamic: bool = False
    # A ranges file (onnxruntime's cache format) to reuse instead of calibrating.
    calibration_cache: str | None = None
    sensitivity_batches: int = 2
    # SmoothQuant migration strength; None: the preset's, 0: off.
    smooth_alpha: float | None = None
    smooth_batches: int = 4
    # None: the preset's (on for the CPU presets).
    cpu_kernels: bool | None = None
    # Use the activation ranges of quantization-aware training (the artifact's qat_ranges.json,
    # handed over in ctx.training_ranges by the stage) instead of calibrating; SmoothQuant off.
    ranges_from_training: bool = False

    def check(self) -> QuantPreset:
        preset = get_preset(self.preset)
        check_choice("method", self.method, METHODS)
        if self.format is not None:
            check_choice("format", self.format, FORMATS)
        if self.samples < 1:
            raise UserError(f"samples must be at least 1, got {self.samples}")
        if not 0.0 < self.percentile <= 100.0:
            raise UserError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise UserError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UserError(f"--max-accuracy-drop must be 0 or more points, got {self.max_accuracy_drop}")
        if self.ranges_from_training:
            check_training_options(self)
        return preset

    def resolved(self) -> dict[str, Any]:
        """The effective settings: the preset's, overridden by what was given."""
        preset = self.check()
        fmt = self.format or preset.format
        return {
            "preset": preset.name,
            "format": fmt,
            "activation_type": preset.activation_type,
            "weight_type": preset.weight_type,
            "per_channel": preset.per_channel if self.per_channel is None else self.per_channel,
            "reduce_range": preset.reduce_range if self.reduce_range is None else self.reduce_range,
            "symmetric_activations": preset.symmetric_activations,
            "attention": preset.attention and fmt == "qoperator",
            "embeddings": preset.embeddings and fmt == "qoperator",
            "smooth_alpha": preset.smooth_alpha if self.smooth_alpha is None else self.smooth_alpha,
            "cpu_kernels": preset.cpu_kernels if self.cpu_kernels is None else self.cpu_kernels,
        }


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def quantize_model(
    model: onnx.ModelProto, ranges: Any, settings: dict[str, Any], nodes: list[str], dynamic: bool = False
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Quantize ``nodes`` of a typed float model with onnxruntime's quantizers; returns the model
    and the counts of our post-rewrites."""
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    work = onnx.ModelProto()
    work.CopyFrom(model)
    op_types = ["MatMul", "Attention", "EmbedLayerNormalization"]
    extra: dict[str, Any] = {
        "MatMulConstBOnly": True,
        "ActivationSymmetric": settings["symmetric_activations"],
        "WeightSymmetric": True,
    }
    act, weight = _qtype(settings["activation_type"]), _qtype(settings["weight_type"])
    rewrites: dict[str, int] = {"matmul_integer_to_float": 0}
    if dynamic:
        quantizer = ONNXQuantizer(
            work,
            settings["per_channel"],
            settings["reduce_range"],
            QuantizationMode.IntegerOps,
            False,
            weight,
            act,
            None,
            nodes,
            [],
            op_types,
            extra,
        )
    elif settings["format"] == "qoperator":
        quantizer = ONNXQuantizer(
            work,
            settings["per_channel"],
            settings["reduce_range"],
            QuantizationMode.IntegerOps,
            True,
            weight,
            act,
            ranges,
            nodes,
            [],
            op_types,
            extra,
        )
    else:
        # MatMul outputs stay float: onnxruntime then runs DQ -> MatMul as MatMulIntegerToFloat
        # instead of requantizing every output (QLinearMatMul + DequantizeLinear, measured slower).
        extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
        quantizer = QDQQuantizer(
            work,
            settings["per_channel"],
            settings["reduce_range"],
            weight,
            act,
            ranges,
            nodes,
            [],
            ["MatMul"],
            extra,
        )
    try:
        quantized = quantizer.quantize_model()
    except Exception as exc:
        raise UserError(f"onnxruntime's quantizer failed: {' '.join(str(exc).split())[:300]}") from exc
    if not dynamic and settings["format"] == "qoperator":
        rewrites["matmul_integer_to_float"] = fuse_matmul_integer_to_float(quantized)
        # The smoothing Muls stay: folding them into per-axis QuantizeLinear was measured 3.7-4.6x
        # slower than dynamic int8 (onnxruntime's per-axis QuantizeLinear is a slow kernel).
    if settings.get("cpu_kernels") and (dynamic or settings["format"] == "qoperator"):
        rewrites.update(prefer_cpu_kernels(quantized))
    return quantized, rewrites


def _strip_absmax(ranges: Any) -> None:
    """Drop the smoothing maxima from the ranges the quantizer sees (it would quantize them)."""
    for key in [k for k in ranges.data if k.endswith(ABSMAX_SUFFIX)]:
        del ranges.data[key]


def _quantized_names(model: onnx.ModelProto, candidates: list[Candidate]) -> list[str]:
    """Candidates that really became integer ops: onnxruntime names the integer node
    ``<name>_quant`` (IntegerOps), or keeps the MatMul and feeds it a DequantizeLinear (QDQ)."""
    integer_ops = {"MatMulInteger", "MatMulIntegerToFloat", "QAttention", "QEmbedLayerNormalization"}
    int_nodes = {n.name for n in model.graph.node if n.op_type in integer_ops}
    producers = {o: n for n in model.graph.node for o in n.output}
    dq_fed = {
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in producers
        and producers[n.input[1]].op_type == "DequantizeLinear"
    }
    return [c.name for c in candidates if c.name in dq_fed or f"{c.name}_quant" in int_nodes]


class QuantizePass(FunctionalPass):
    def __init__(self, config: QuantizeConfig, ctx: PassContext) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx
        self._cache: Path | None = None  # the calibration ranges this run wrote, if any

    # -- steps ---------------------------------------------------------------------------------
    def _prepare(self, proto: onnx.ModelProto, stats: dict[str, Any]) -> onnx.ModelProto:
        already = quantized_ops(proto)
        if already:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(already.items()))
            raise UserError(f"the model is already quantized ({ops}); quantize the float artifact instead")
        if self.config.fuse and not any(
            n.op_type in ("Attention", "MultiHeadAttention") for n in proto.graph.node
        ):
            fuse_cfg = FuseConfig(num_heads=self.config.num_heads, hidden_size=self.config.hidden_size)
            proto, fuse_stats = fuse_proto(proto, fuse_cfg, self.ctx.scratch)
            stats["fusion"] = fuse_stats
        else:
            stats["fusion"] = {
                "fusions": {},
                "skipped": "already fused" if self.config.fuse else "fuse=false",
            }
        proto = infer_types(proto, self.ctx.scratch)
        name_nodes(proto)
        return proto

    def _ranges(
        self,
        proto: onnx.ModelProto,
        candidates: list[Candidate],
        settings: dict[str, Any],
        scratch: Path,
        stats: dict[str, Any],
        amax: dict[str, np.ndarray],
    ) -> Any:
        needed = sorted({c.activation for c in candidates if c.activation})
        started = time.perf_counter()
        cfg = self.config
        if cfg.ranges_from_training:
            ranges, info = training_ranges(proto, candidates, *self._training_record())
            stats["calibration"] = {**info, "seconds": round(time.perf_counter() - started, 2)}
            return ranges
        if cfg.calibration_cache is not None:
            path = Path(cfg.calibration_cache)
            if not path.is_file():
                raise UserError(
                    f"calibration cache {path} does not exist; drop --calibration-cache to calibrate"
                )
            ranges = load_ranges(path)
            _strip_absmax(ranges)
            method = str(getattr(ranges, "calibration_method", "")).rsplit(".", 1)[-1].lower()
            if method and method != cfg.method:
                raise UserError(
                    f"calibration cache {path} holds {method} ranges, not {cfg.method}; pass --method {method}"
                )
            missing = [n for n in needed if n not in ranges]
            if missing:
                raise UserError(
                    f"calibration cache {path} does not match this model ({len(missing)} tensors missing, e.g. "
                    f"{missing[0]!r}); delete it to recalibrate"
                )
            stats["calibration"] = {
                "method": cfg.method,
                "cache": "reused",
                "seconds": round(time.perf_counter() - started, 2),
            }
            return ranges
        make_source = self.ctx.require_calibration("quantize")
        # Calibrate the activations the quantizer reads (the chosen nodes' inputs), nothing else.
        ranges, rows = calibrate(
            proto,
            make_source,
            cfg.method,
            ["MatMul", "Attention"],
            cfg.samples,
            scratch,
            percentile=cfg.percentile,
            symmetric=settings["symmetric_activations"],
        )
        missing = [n for n in needed if n not in ranges]
        if missing:
            raise UserError(
                f"calibration produced no range for {missing[0]!r}; the graph's types could not be inferred"
            )
        from onnxruntime.quantization.calibrate import TensorData

        for name, values in amax.items():
            high = np.asarray(values, dtype=np.float32)
            ranges.data[name + ABSMAX_SUFFIX] = TensorData(lowest=-high, highest=high)
        cache = scratch / RANGES_FILE
        save_ranges(ranges, cache)
        _strip_absmax(ranges)
        self._cache = cache
        stats["calibration"] = {
            "method": cfg.method,
            "rows": rows,
            "cache": RANGES_FILE,
            "seconds": round(time.perf_counter() - started, 2),
        }
        return ranges

    def _training_record(self) -> tuple[dict[str, Any], str]:
        record = self.ctx.training_ranges
        if record is None:
            raise UserError(
                "ranges_from_training needs the model's qat_ranges.json; run `trimformer quantize --ranges-from-training`"
            )
        return record, self.ctx.training_ranges_file or QAT_RANGES_FILE

    def _feeds(self, count: int) -> list[dict[str, np.ndarray]]:
        if self.ctx.calibration is None:
            return []
        source = self.ctx.calibration()
        feeds: list[dict[str, np.ndarray]] = []
        while len(feeds) < count and (feed := source.get_next()) is not None:
            feeds.append(feed)
        return feeds

    def _output_error(
        self, reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
    ) -> float | None:
        """Relative L2 error of output 0 against the float graph on calibration batches."""
        import onnxruntime as ort

        if not feeds:
            return None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions = [
            ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            for m in (reference, candidate)
        ]
        num = den = 0.0
        for feed in feeds:
            ref, got = (np.asarray(s.run(None, feed)[0], dtype=np.float64) for s in sessions)
            num += float(np.sum((got - ref) ** 2))
            den += float(np.sum(ref**2))
        return round(float(np.sqrt(num / max(den, 1e-30))), 5)

    def _accuracy_aware(
        self,
        float_proto: onnx.ModelProto,
        typed: onnx.ModelProto,
        quantized: onnx.ModelProto,
        candidates: list[Candidate],
        chosen: list[str],
        ranges: Any,
        settings: dict[str, Any],
        stats: dict[str, Any],
    ) -> onnx.ModelProto:
        cfg = self.config
        assert cfg.max_accuracy_drop is not None
        if self.ctx.evaluate is None:
            raise UserError("--max-accuracy-drop needs an evaluation set; pass --eval DATA")
        budget = cfg.max_accuracy_drop
        base = self.ctx.evaluate(float_proto)
        tried: list[dict[str, Any]] = []

        def drop_of(model: onnx.ModelProto, n_float: int) -> float:
            score = self.ctx.evaluate(model)  # type: ignore[misc]
            drop = round((base - score) * 100.0, 4)
            tried.append({"float_nodes": n_float, "accuracy": round(score, 5), "drop_points": drop})
            return drop

        drop = drop_of(quantized, 0)
        accuracy: dict[str, Any] = {"float_accuracy": round(base, 5), "budget_points": budget, "tried": tried}
        stats["accuracy_aware"] = accuracy
        if drop <= budget:
            accuracy.update(returned_to_float=[], final_drop_points=drop)
            return quantized
        feeds = self._feeds(cfg.sensitivity_batches)
        by_name = {c.name: c for c in candidates}
        sens = node_sensitivity(
            typed,
            [by_name[n] for n in chosen],
            ranges,
            feeds,
            signed_activations=settings["activation_type"] == "int8",
            symmetric=settings["symmetric_activations"],
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
        )
        order = sorted(chosen, key=lambda n: -sens[n])
        accuracy["sensitivity"] = {n: round(sens[n], 5) for n in order}
        best: tuple[int, onnx.ModelProto, float] | None = None

        def attempt(k: int) -> tuple[onnx.ModelProto, float]:
            keep = [n for n in chosen if n not in set(order[:k])]
            # With every node float the candidate is the fused float graph.
            model = typed if not keep else quantize_model(typed, ranges, settings, keep, cfg.dynamic)[0]
            return model, drop_of(model, k)

        # Doubling, then bisection: about 2 log2(n) evaluations instead of n.
        lo, k = 0, 1
        while True:
            k = min(k, len(order))
            model, drop = attempt(k)
            if drop <= budget:
                best = (k, model, drop)
                break
            lo = k
            if k == len(order):
                break
            k *= 2
        if best is None:
            stats["accuracy_aware"]["final_drop_points"] = drop
            raise GateFailed(
                f"accuracy budget of {budget:g} points cannot be met: the drop is still {drop:.2f} points "
                f"with every one of the {len(order)} quantizable nodes in float; nothing was written"
            )
        hi = best[0]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            model, drop = attempt(mid)
            if drop <= budget:
                best, hi = (mid, model, drop), mid
            else:
                lo = mid
        k, model, drop = best
        accuracy["returned_to_float"] = [
            {
                "node": n,
                "op": by_name[n].op_type,
                "sensitivity": round(sens[n], 5),
                "reason": f"sensitivity rank {i + 1} of {len(order)}; returned to float to fit the {budget:g}-point budget",
            }
            for i, n in enumerate(order[:k])
        ]
        accuracy["final_drop_points"] = drop
        return model

    # -- the pass --------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        settings = cfg.resolved()
        if cfg.ranges_from_training:
            settings = check_training_settings(settings, self._training_record()[0], cfg.preset)
        started = time.perf_counter()
        stats: dict[str, Any] = {"settings": settings, "method": cfg.method, "dynamic": cfg.dynamic}
        float_proto = ir.to_proto(model)
        self.ctx.scratch.mkdir(parents=True, exist_ok=True)
        typed = self._prepare(float_proto, stats)
        phases = {"prepare": round(time.perf_counter() - started, 2)}
        candidates = quantizable_nodes(
            typed, settings["attention"] or cfg.dynamic, settings["embeddings"] or cfg.dynamic
        )
        if not candidates:
            raise UserError(
                "the graph has nothing to quantize (no MatMul with a constant weight, no Attention); "
                "quantize an exported Transformer"
            )
        unknown = [n for n in cfg.exclude if n not in {c.name for c in candidates}]
        if unknown:
            raise UserError(f"--exclude names {unknown[0]!r}, which is not a quantizable node of this graph")
        chosen = [c.name for c in candidates if c.name not in cfg.exclude]
        alpha = settings["smooth_alpha"]
        amax: dict[str, np.ndarray] = {}
        if alpha and not cfg.dynamic:
            acts = sorted({c.activation for c in candidates if c.activation and c.name in chosen})
            if cfg.calibration_cache is not None and Path(cfg.calibration_cache).is_file():
                cached = load_ranges(Path(cfg.calibration_cache))
                amax = {
                    a: np.asarray(cached[a + ABSMAX_SUFFIX].highest)
                    for a in acts
                    if a + ABSMAX_SUFFIX in cached
                }
            else:
                amax = channel_absmax(typed, acts, self._feeds(cfg.smooth_batches))
            count = insert_smoothing(typed, [c for c in candidates if c.name in chosen], amax, alpha)
            stats["smoothing"] = {"alpha": alpha, "nodes": count}
            candidates = quantizable_nodes(typed, settings["attention"], settings["embeddings"])
        self.ctx.scratch.mkdir(parents=True, exist_ok=True)
        scratch_dir = tempfile.TemporaryDirectory(prefix="trimformer-quant-", dir=self.ctx.scratch)
        scratch = Path(scratch_dir.name)
        try:
            ranges = None if cfg.dynamic else self._ranges(typed, candidates, settings, scratch, stats, amax)
            phases["calibrate"] = round(time.perf_counter() - started - sum(phases.values()), 2)
            quantized, rewrites = quantize_model(typed, ranges, settings, chosen, cfg.dynamic)
            phases["quantize"] = round(time.perf_counter() - started - sum(phases.values()), 2)
            if cfg.max_accuracy_drop is not None:
                quantized = self._accuracy_aware(
                    float_proto, typed, quantized, candidates, chosen, ranges, settings, stats
                )
            files: dict[str, Path] = {}
            if self._cache is not None:
                # Keep the cache beyond the scratch folder's life: the stage copies it into the artifact.
                kept = Path(tempfile.mkdtemp(prefix="trimformer-ranges-", dir=self.ctx.scratch)) / RANGES_FILE
                kept.write_bytes(self._cache.read_bytes())
                files[RANGES_FILE] = kept
        finally:
            scratch_dir.cleanup()
        done = set(_quantized_names(quantized, candidates))
        returned = {
            r["node"]: r["reason"] for r in stats.get("accuracy_aware", {}).get("returned_to_float", [])
        }
        float_nodes = []
        for c in candidates:
            if c.name in done:
                continue
            reason = returned.get(c.name) or (
                "excluded by the user"
                if c.name in cfg.exclude
                else "left float by onnxruntime's quantizer (no range or unsupported)"
            )
            float_nodes.append({"node": c.name, "op": c.op_type, "reason": reason})
        stats.update(
            quantizable=len(candidates),
            quantized=len(done),
            quantized_ops=quantized_ops(quantized),
            rewrites=rewrites,
            float_nodes=float_nodes,
            float_ops=float_op_summary(typed, [c for c in candidates if c.name in done]),
            output_rel_error=self._output_error(float_proto, quantized, self._feeds(1)),
            seconds=round(time.perf_counter() - started, 2),
            phase_seconds=phases,
        )
        logger.info("quantize: %d of %d nodes int8 (%s)", len(done), len(candidates), settings["format"])
        return PassReport(ir.from_proto(quantized), modified=True, stats=stats, files=files)


@register_pass("quantize", QuantizeConfig)
def make_quantize_pass(config: QuantizeConfig, ctx: PassContext) -> QuantizePass:
    config.check()
    return QuantizePass(config, ctx)


__all__ += ["FORMATS", "METHODS", "PRESETS"]
