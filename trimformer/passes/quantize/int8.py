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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass
from pydantic import Field, ValidationInfo, field_validator, model_validator

from trimformer import defaults
from trimformer.errors import UserError
from trimformer.formats.qat_ranges import QAT_RANGES_FILE
from trimformer.passes._checks import compare_outputs
from trimformer.passes.base import PassConfig, PassContext, PassReport, register_pass
from trimformer.passes.fuse.fusion import FuseConfig, fuse_proto
from trimformer.passes.quantize.accuracy import fit_accuracy_budget
from trimformer.passes.quantize.calibrate import calibrate, infer_types, load_ranges, save_ranges
from trimformer.passes.quantize.graph import (
    Candidate,
    float_op_summary,
    name_nodes,
    quantizable_nodes,
    quantized_ops,
)
from trimformer.passes.quantize.presets import (
    AUTO_PRESET,
    FORMATS,
    METHODS,
    PRESET_NAMES,
    PRESETS,
    QuantizerSettings,
    check_choice,
    get_preset,
)
from trimformer.passes.quantize.quantizer import quantize_model, quantized_names
from trimformer.passes.quantize.smooth import ABSMAX_SUFFIX, channel_absmax, insert_smoothing
from trimformer.passes.quantize.training_ranges import (
    check_training_options,
    check_training_settings,
    training_ranges,
)

__all__ = ["RANGES_FILE", "QuantizeConfig", "QuantizePass"]

logger = logging.getLogger(__name__)

RANGES_FILE = "calibration_ranges.json"


class QuantizeConfig(PassConfig):
    # "auto": the preset of the CPU it runs on (presets.host_preset).
    preset: str = AUTO_PRESET
    method: str = "minmax"
    # None: the preset's.
    format: str | None = None
    per_channel: bool | None = None
    reduce_range: bool | None = None
    samples: int = Field(default=defaults.QUANTIZE_SAMPLES, ge=1)
    percentile: float = Field(default=99.999, gt=0.0, le=100.0)
    # Node names to keep in float whatever the policy says.
    exclude: list[str] = Field(default_factory=list)
    fuse: bool = True
    num_heads: int = Field(default=0, ge=0)
    hidden_size: int = Field(default=0, ge=0)
    # Accuracy-aware mode: largest accepted drop, in accuracy points, against the float model.
    max_accuracy_drop: float | None = Field(default=None, ge=0.0, description="0 or more accuracy points")
    dynamic: bool = False
    # A ranges file (onnxruntime's cache format) to reuse instead of calibrating.
    calibration_cache: str | None = None
    sensitivity_batches: int = Field(default=2, ge=1)
    # SmoothQuant migration strength; None: the preset's, 0: off.
    smooth_alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    smooth_batches: int = Field(default=4, ge=1)
    # None: the preset's (on for the CPU presets).
    cpu_kernels: bool | None = None
    # Use the activation ranges of quantization-aware training (the artifact's qat_ranges.json,
    # handed over in ctx.training_ranges by the stage) instead of calibrating; SmoothQuant off.
    ranges_from_training: bool = False
    # The word table: int8 (QEmbedLayerNormalization, or GatherBlockQuantized where no embedding
    # fusion applies); int4 (GatherBlockQuantized, two values a byte: the embedding fusion stays
    # off); auto: int4 where the model stays within max_accuracy_drop with it, else int8.
    embedding: Literal["int8", "int4", "auto"] = Field("int8", description="one of int8, int4, auto")

    @field_validator("preset", "method", "format")
    @classmethod
    def _known_choice(cls, value: str | None, info: ValidationInfo) -> str | None:
        known = {"preset": PRESET_NAMES, "method": METHODS, "format": FORMATS}[info.field_name or ""]
        if value is not None:
            try:
                check_choice(str(info.field_name), value, known)
            except UserError as exc:  # pydantic reports a ValueError with the field's name
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _table_budget(self) -> QuantizeConfig:
        if self.embedding == "auto" and self.max_accuracy_drop is None:
            raise ValueError(
                "embedding auto picks int4 or int8 by the accuracy budget; give max_accuracy_drop "
                "(--max-accuracy-drop) and an evaluation set, or choose int8 or int4"
            )
        return self

    @model_validator(mode="after")
    def _training_options(self) -> QuantizeConfig:
        if self.ranges_from_training:
            try:
                check_training_options(self)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return self

    def check(self) -> QuantizerSettings:
        """The preset, after validating again (``model_copy`` skips validation); a UserError."""
        type(self)(**self.model_dump())
        return get_preset(self.preset, trained_for_full_range=self.ranges_from_training)

    def resolved(self) -> QuantizerSettings:
        """The effective settings: the preset's, overridden by what was given."""
        return self.check().overridden(
            format=self.format,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
            smooth_alpha=self.smooth_alpha,
            cpu_kernels=self.cpu_kernels,
        )


def _strip_absmax(ranges: Any) -> None:
    """Drop the smoothing maxima from the ranges the quantizer sees (it would quantize them)."""
    for key in [k for k in ranges.data if k.endswith(ABSMAX_SUFFIX)]:
        del ranges.data[key]


class _Phases:
    """Seconds per phase of the pass, for the report."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 2)
        self._last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 2)


class QuantizePass(FunctionalPass):
    def __init__(self, config: QuantizeConfig, ctx: PassContext) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx
        self._cache: Path | None = None  # the calibration ranges this run wrote, if any

    # -- steps ---------------------------------------------------------------------------------
    def _settings(self) -> QuantizerSettings:
        settings = self.config.resolved()
        if self.config.ranges_from_training:
            settings = check_training_settings(settings, self._training_record()[0], self.config.preset)
        return settings

    def _prepare(self, proto: onnx.ModelProto, stats: dict[str, Any]) -> onnx.ModelProto:
        already = quantized_ops(proto)
        if already:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(already.items()))
            raise UserError(f"the model is already quantized ({ops}); quantize the float artifact instead")
        if self.config.fuse and not any(
            n.op_type in ("Attention", "MultiHeadAttention") for n in proto.graph.node
        ):
            fuse_cfg = FuseConfig(
                num_heads=self.config.num_heads,
                hidden_size=self.config.hidden_size,
                embed_layer_norm=self.config.embedding == "int8",
            )
            proto, fuse_stats = fuse_proto(proto, fuse_cfg, self.ctx.scratch, self.ctx.target)
            stats["fusion"] = fuse_stats
        else:
            stats["fusion"] = {
                "fusions": {},
                "skipped": "already fused" if self.config.fuse else "fuse=false",
            }
        proto = infer_types(proto, self.ctx.scratch)
        name_nodes(proto)
        return proto

    def _candidates(self, typed: onnx.ModelProto, settings: QuantizerSettings) -> list[Candidate]:
        """The nodes the policy quantizes (dynamic int8 has integer kernels for all of them)."""
        dynamic = self.config.dynamic
        candidates = quantizable_nodes(typed, settings.attention or dynamic, settings.embeddings or dynamic)
        if not candidates:
            raise UserError(
                "the graph has nothing to quantize (no MatMul with a constant weight, no Attention); "
                "quantize an exported Transformer"
            )
        unknown = [n for n in self.config.exclude if n not in {c.name for c in candidates}]
        if unknown:
            raise UserError(f"--exclude names {unknown[0]!r}, which is not a quantizable node of this graph")
        return candidates

    def _smooth(
        self,
        typed: onnx.ModelProto,
        candidates: list[Candidate],
        chosen: list[str],
        settings: QuantizerSettings,
        stats: dict[str, Any],
    ) -> tuple[list[Candidate], dict[str, np.ndarray]]:
        """SmoothQuant in place on ``typed``: the candidates of the smoothed graph and the per-channel
        activation maxima it used (kept in the ranges cache so a reuse smooths the same way)."""
        cfg, alpha = self.config, settings.smooth_alpha
        if not alpha or cfg.dynamic:
            return candidates, {}
        acts = sorted({c.activation for c in candidates if c.activation and c.name in chosen})
        if cfg.calibration_cache is not None and Path(cfg.calibration_cache).is_file():
            cached = load_ranges(Path(cfg.calibration_cache))
            amax = {
                a: np.asarray(cached[a + ABSMAX_SUFFIX].highest) for a in acts if a + ABSMAX_SUFFIX in cached
            }
        else:
            amax = channel_absmax(typed, acts, self._feeds(cfg.smooth_batches))
        count = insert_smoothing(typed, [c for c in candidates if c.name in chosen], amax, alpha)
        stats["smoothing"] = {"alpha": alpha, "nodes": count}
        return quantizable_nodes(typed, settings.attention, settings.embeddings), amax

    def _ranges(
        self,
        proto: onnx.ModelProto,
        candidates: list[Candidate],
        settings: QuantizerSettings,
        scratch: Path,
        amax: dict[str, np.ndarray],
    ) -> tuple[Any, dict[str, Any]]:
        """The activation ranges (from training, a cache, or calibration) and the report's
        ``calibration`` section."""
        needed = sorted({c.activation for c in candidates if c.activation})
        started = time.perf_counter()
        if self.config.ranges_from_training:
            ranges, info = training_ranges(proto, candidates, *self._training_record())
        elif self.config.calibration_cache is not None:
            ranges, info = self._cached_ranges(Path(self.config.calibration_cache), needed)
        else:
            ranges, info = self._calibrated_ranges(
                proto, needed, settings.symmetric_activations, scratch, amax
            )
        return ranges, {**info, "seconds": round(time.perf_counter() - started, 2)}

    def _cached_ranges(self, path: Path, needed: list[str]) -> tuple[Any, dict[str, Any]]:
        method = self.config.method
        if not path.is_file():
            raise UserError(f"calibration cache {path} does not exist; drop --calibration-cache to calibrate")
        ranges = load_ranges(path)
        _strip_absmax(ranges)
        cached_method = str(getattr(ranges, "calibration_method", "")).rsplit(".", 1)[-1].lower()
        if cached_method and cached_method != method:
            raise UserError(
                f"calibration cache {path} holds {cached_method} ranges, not {method}; "
                f"pass --method {cached_method}"
            )
        missing = [n for n in needed if n not in ranges]
        if missing:
            raise UserError(
                f"calibration cache {path} does not match this model ({len(missing)} tensors missing, e.g. "
                f"{missing[0]!r}); delete it to recalibrate"
            )
        return ranges, {"method": method, "cache": "reused"}

    def _calibrated_ranges(
        self,
        proto: onnx.ModelProto,
        needed: list[str],
        symmetric: bool,
        scratch: Path,
        amax: dict[str, np.ndarray],
    ) -> tuple[Any, dict[str, Any]]:
        """Calibrate the activations the quantizer reads; the ranges are also saved as the cache,
        with the smoothing maxima, so a reuse smooths and quantizes the same way."""
        from onnxruntime.quantization.calibrate import TensorData

        cfg = self.config
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
            symmetric=symmetric,
        )
        missing = [n for n in needed if n not in ranges]
        if missing:
            raise UserError(
                f"calibration produced no range for {missing[0]!r}; the graph's types could not be inferred"
            )
        for name, values in amax.items():
            high = np.asarray(values, dtype=np.float32)
            ranges.data[name + ABSMAX_SUFFIX] = TensorData(lowest=-high, highest=high)
        cache = scratch / RANGES_FILE
        save_ranges(ranges, cache)
        _strip_absmax(ranges)
        self._cache = cache
        return ranges, {"method": cfg.method, "rows": rows, "cache": RANGES_FILE}

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

    def _output_error(self, reference: onnx.ModelProto, candidate: onnx.ModelProto) -> float | None:
        """Relative L2 error of output 0 against the float graph on a calibration batch."""
        feeds = self._feeds(1)
        if not feeds:
            return None
        return round(compare_outputs(reference, candidate, feeds).relative, 5)

    def _quantize(
        self,
        float_proto: onnx.ModelProto,
        typed: onnx.ModelProto,
        candidates: list[Candidate],
        chosen: list[str],
        settings: QuantizerSettings,
        amax: dict[str, np.ndarray],
        stats: dict[str, Any],
        phases: _Phases,
    ) -> tuple[onnx.ModelProto, dict[str, int], dict[str, Path]]:
        """Ranges, quantizer, accuracy budget: the quantized model, the rewrite counts and the
        files for the artifact (the calibration ranges)."""
        cfg = self.config
        scratch_dir = tempfile.TemporaryDirectory(prefix="trimformer-quant-", dir=self.ctx.scratch)
        try:
            ranges = None
            if not cfg.dynamic:
                ranges, stats["calibration"] = self._ranges(
                    typed, candidates, settings, Path(scratch_dir.name), amax
                )
            phases.done("calibrate")

            def quantize(bits: int) -> tuple[onnx.ModelProto, dict[str, int]]:
                return quantize_model(typed, ranges, settings, chosen, cfg.dynamic, table_bits=bits)

            quantized, rewrites = self._with_table(float_proto, quantize, settings, stats)
            phases.done("quantize")
            if cfg.max_accuracy_drop is not None:
                quantized, stats["accuracy_aware"] = fit_accuracy_budget(
                    float_proto,
                    typed,
                    quantized,
                    [c for c in candidates if c.name in set(chosen)],
                    ranges,
                    settings,
                    cfg.dynamic,
                    cfg.max_accuracy_drop,
                    self.ctx.evaluate,
                    self._feeds(cfg.sensitivity_batches),
                )
            return quantized, rewrites, self._keep_cache()
        finally:
            scratch_dir.cleanup()

    def _with_table(
        self,
        float_proto: onnx.ModelProto,
        quantize: Callable[[int], tuple[onnx.ModelProto, dict[str, int]]],
        settings: QuantizerSettings,
        stats: dict[str, Any],
    ) -> tuple[onnx.ModelProto, dict[str, int]]:
        """The quantized model with its word table at the asked bits; "auto" tries 4 bits and keeps
        them where the model's accuracy drop stays within the budget, else quantizes at 8."""
        asked = self.config.embedding
        if asked == "int8":
            return quantize(8)
        if not settings.embeddings or "GatherBlockQuantized" not in self._target_ops():
            if asked == "int4":
                raise UserError(
                    "embedding int4 stores the word table as GatherBlockQuantized in the qoperator format; "
                    f"{self._target_name()} runs no such table; use --embedding int8"
                )
            stats["word_table"] = {"bits": 8, "chosen_by": f"{self._target_name()} has no 4-bit table kernel"}
            return quantize(8)
        four = quantize(4)
        if not four[1].get("word_embeddings_4bit"):
            raise UserError(
                "the graph's embeddings are already fused (EmbedLayerNormalization, whose quantized form holds "
                "8-bit tables only); for a 4-bit word table quantize the unfused graph"
            )
        if asked == "int4":
            return four
        evaluate, budget = self.ctx.evaluate, self.config.max_accuracy_drop
        if evaluate is None or budget is None:
            raise UserError("--embedding auto needs an evaluation set; pass --eval DATA")
        reference = evaluate(float_proto)
        score = evaluate(four[0])
        drop = round((reference - score) * 100.0, 4)
        keep = drop <= budget
        stats["word_table"] = {
            "bits": 4 if keep else 8,
            "chosen_by": "accuracy budget",
            "budget_points": budget,
            "accuracy_float": round(reference, 5),
            "accuracy_with_4bit_table": round(score, 5),
            "drop_points_with_4bit_table": drop,
        }
        logger.info(
            "word table: 4 bits drop %.2f points (budget %g): keeping %d bits", drop, budget, 4 if keep else 8
        )
        return four if keep else quantize(8)

    def _target_ops(self) -> frozenset[str]:
        target = self.ctx.target
        return frozenset({"GatherBlockQuantized"}) if target is None else target.allowed_ms_ops()

    def _target_name(self) -> str:
        return "this preset" if self.ctx.target is None else f"target {self.ctx.target.name}"

    def _keep_cache(self) -> dict[str, Path]:
        """The calibration ranges, beyond the scratch folder's life: the stage copies them into the artifact."""
        if self._cache is None:
            return {}
        kept = Path(tempfile.mkdtemp(prefix="trimformer-ranges-", dir=self.ctx.scratch)) / RANGES_FILE
        kept.write_bytes(self._cache.read_bytes())
        return {RANGES_FILE: kept}

    def _float_nodes(
        self, candidates: list[Candidate], done: set[str], stats: dict[str, Any]
    ) -> list[dict[str, str]]:
        """The candidates left in float, each with the reason why."""
        returned = {
            r["node"]: r["reason"] for r in stats.get("accuracy_aware", {}).get("returned_to_float", [])
        }
        float_nodes = []
        for c in candidates:
            if c.name in done:
                continue
            reason = returned.get(c.name) or (
                "excluded by the user"
                if c.name in self.config.exclude
                else "left float by onnxruntime's quantizer (no range or unsupported)"
            )
            float_nodes.append({"node": c.name, "op": c.op_type, "reason": reason})
        return float_nodes

    # -- the pass --------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        settings = self._settings()
        phases = _Phases()
        stats: dict[str, Any] = {"settings": settings.to_dict(), "method": cfg.method, "dynamic": cfg.dynamic}
        float_proto = ir.to_proto(model)
        self.ctx.scratch.mkdir(parents=True, exist_ok=True)
        typed = self._prepare(float_proto, stats)
        phases.done("prepare")
        candidates = self._candidates(typed, settings)
        chosen = [c.name for c in candidates if c.name not in cfg.exclude]
        candidates, amax = self._smooth(typed, candidates, chosen, settings, stats)
        quantized, rewrites, files = self._quantize(
            float_proto, typed, candidates, chosen, settings, amax, stats, phases
        )
        done = set(quantized_names(quantized, candidates))
        stats.update(
            quantizable=len(candidates),
            quantized=len(done),
            quantized_ops=quantized_ops(quantized),
            rewrites=rewrites,
            float_nodes=self._float_nodes(candidates, done, stats),
            float_ops=float_op_summary(typed, [c for c in candidates if c.name in done]),
            output_rel_error=self._output_error(float_proto, quantized),
            seconds=phases.total(),
            phase_seconds=phases.seconds,
        )
        logger.info("quantize: %d of %d nodes int8 (%s)", len(done), len(candidates), settings.format)
        return PassReport(ir.from_proto(quantized), modified=True, stats=stats, files=files)


@register_pass("quantize", QuantizeConfig, order=2, data=("calibration", "eval"), emits=("com.microsoft",))
def make_quantize_pass(config: QuantizeConfig, ctx: PassContext) -> QuantizePass:
    config.check()
    return QuantizePass(config, ctx)


__all__ += ["FORMATS", "METHODS", "PRESETS"]
