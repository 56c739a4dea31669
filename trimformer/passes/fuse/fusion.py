"""The ``fuse`` pass: transformer fusions through onnxruntime's maintained optimizer.

Attention, EmbedLayerNormalization, SkipLayerNormalization, LayerNormalization and (Bias)Gelu are
fused by ``onnxruntime.transformers.optimizer.optimize_model`` with ``opt_level=0`` (its Python
fusions only, no hardware-specific ORT rewrites), so the result still runs on any CPU or GPU.
The pass reports how many times each fusion fired; its ``ensures()`` checks the fused graph
numerically against the input graph on seeded random inputs.

onnxruntime cannot find the head count on the TorchScript export (the reshape sizes are computed
at run time); :func:`detect_attention_dims` reads it from the constant ``head_dim`` of the
``(batch, seq, -1, head_dim)`` reshapes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx_ir.passes import FunctionalPass
from pydantic import Field, field_validator

from trimformer.errors import ParityError, UserError
from trimformer.formats.targets import Target
from trimformer.passes._checks import compare_outputs, random_feeds
from trimformer.passes.base import PassConfig, PassContext, PassReport, SelfCheckingPass, register_pass
from trimformer.passes.fuse.cpu_kernels import prefer_cpu_kernels

__all__ = [
    "FUSED_OPS",
    "FuseConfig",
    "FusePass",
    "check_same_outputs",
    "detect_attention_dims",
    "fuse_proto",
    "fused_op_counts",
    "in_scratch_dir",
]

logger = logging.getLogger(__name__)

FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
)
MS_DOMAIN = "com.microsoft"


class FuseConfig(PassConfig):
    """``num_heads``/``hidden_size`` 0 means: detect them from the graph."""

    model_type: str = "bert"
    num_heads: int = Field(default=0, ge=0)
    hidden_size: int = Field(default=0, ge=0)
    # Tolerance of the check of the fused graph against the input graph (max abs diff of output 0).
    atol: float = Field(default=1e-3, gt=0.0)
    # onnxruntime's faster CPU kernels for the same arithmetic (cpu_kernels.py); off for GPU targets.
    cpu_kernels: bool = True
    # EmbedLayerNormalization (word + position + segment lookups and their LayerNorm in one op). Off
    # where the word table is stored in 4 bits: its quantized form holds 8-bit tables only.
    embed_layer_norm: bool = True

    @field_validator("model_type")
    @classmethod
    def _known_model_type(cls, value: str) -> str:
        # What onnxruntime's optimizer accepts; it would refuse anything else only when run.
        from onnxruntime.transformers.optimizer import MODEL_TYPES

        if value not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {value!r}; known model types: {', '.join(MODEL_TYPES)}")
        return value


@contextlib.contextmanager
def in_scratch_dir(base: Path | None = None) -> Any:
    """Run onnxruntime's shape-inference helpers from a scratch folder: on failure they drop
    ``sym_shape_infer_temp.onnx`` and a large ``.data`` file into the current directory."""
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="trimformer-ort-", dir=base) as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(previous)


def _const_ints(graph: onnx.GraphProto) -> dict[str, list[int]]:
    values: dict[str, list[int]] = {}
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.INT64:
            values[init.name] = numpy_helper.to_array(init).reshape(-1).tolist()
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and node.attribute
            and node.attribute[0].type == onnx.AttributeProto.TENSOR
        ):
            tensor = node.attribute[0].t
            if tensor.data_type == onnx.TensorProto.INT64:
                values[node.output[0]] = numpy_helper.to_array(tensor).reshape(-1).tolist()
    return values


@dataclass(frozen=True)
class HeadSplit:
    """One attention projection's head split: ``Reshape(MatMul(x, W) [+ b], (batch, seq, heads,
    head_dim))``, the shape a constant or (TorchScript export) a ``Concat`` of constants."""

    reshape: onnx.NodeProto
    concat: onnx.NodeProto | None
    heads: int | None  # None: not a constant; -1: inferred at run time
    head_dim: int
    weight: tuple[int, ...]  # the projection's (input width, output width)


def head_splits(model: onnx.ModelProto) -> list[HeadSplit]:
    """Every head split of the graph: the one place that reads head counts and widths from it."""
    graph = model.graph
    consts = _const_ints(graph)
    producers = {out: node for node in graph.node for out in node.output}
    widths = {init.name: tuple(init.dims) for init in graph.initializer}
    splits = []
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        concat = None
        constant = consts.get(node.input[1])
        shape: list[int | None] | None = None if constant is None else [*constant]
        if shape is None and node.input[1] in producers and producers[node.input[1]].op_type == "Concat":
            concat = producers[node.input[1]]
            parts = [consts.get(i) for i in concat.input]
            if len(parts) == 4 and parts[3] is not None and len(parts[3]) == 1:
                heads = parts[2][0] if parts[2] is not None and len(parts[2]) == 1 else None
                shape = [0, 0, heads, parts[3][0]]
        if shape is None or len(shape) != 4 or shape[3] is None or shape[3] <= 0:
            continue
        src = producers.get(node.input[0])
        if src is not None and src.op_type == "Add":
            src = next((producers[i] for i in src.input if producers.get(i, src).op_type == "MatMul"), None)
        weight = widths.get(src.input[1]) if src is not None and src.op_type == "MatMul" else None
        if weight is None or len(weight) != 2 or weight[1] % shape[3]:
            continue
        splits.append(HeadSplit(node, concat, shape[2], shape[3], weight))
    return splits


def detect_attention_dims(model: onnx.ModelProto) -> tuple[int, int]:
    """(num_heads, hidden_size) from the graph's head splits, or (0, 0) when there is none or the
    layers differ (head-pruned: each layer keeps its own count, pinned into its Reshape, and (0, 0)
    makes onnxruntime read every layer's count there instead of one global value)."""
    head_dims: Counter[tuple[int, int]] = Counter()
    for split in head_splits(model):
        if split.weight[0] != split.weight[1]:
            return 0, 0
        head_dims[(split.weight[1] // split.head_dim, split.weight[0])] += 1
    if not head_dims:
        return 0, 0
    return head_dims.most_common(1)[0][0]


def pin_head_counts(model: onnx.ModelProto) -> int:
    """Write every attention layer's head count into its head-split Reshape, in place; returns how
    many Reshapes were pinned.

    The TorchScript export splits heads with ``Reshape(x, Concat(batch, seq, -1, head_dim))``: the
    count is inferred at run time. onnxruntime's fusion reads it from that constant, and with -1
    it falls back to one global ``num_heads``, which a pruned model with a different count per
    layer cannot have: its unpruned layers then lose their Attention fusion ("Failed to detect
    num_heads"). The count is the projection's width over ``head_dim``, read from the graph."""
    pinned = 0
    for split in head_splits(model):
        if split.concat is None or split.heads != -1:
            continue
        name = f"{split.concat.name or split.concat.output[0]}_heads"
        count = np.array([split.weight[1] // split.head_dim], np.int64)
        model.graph.initializer.append(numpy_helper.from_array(count, name))
        split.concat.input[2] = name
        pinned += 1
    return pinned


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


# onnxruntime's fusions (FusionOptions switches) and the com.microsoft ops each one writes: a
# fusion whose op the target lacks is switched off, so the fused graph fits the target.
_FUSION_OPS = {
    "enable_attention": ("Attention",),
    "enable_embed_layer_norm": ("EmbedLayerNormalization",),
    "enable_skip_layer_norm": ("SkipLayerNormalization",),
    "enable_bias_skip_layer_norm": ("SkipLayerNormalization",),
    "enable_bias_gelu": ("BiasGelu", "FastGelu"),
    "enable_gelu": ("Gelu",),
    "enable_gelu_approximation": ("FastGelu",),
    "enable_gemm_fast_gelu": ("GemmFastGelu",),
    "enable_rotary_embeddings": ("RotaryEmbedding",),
    "enable_qordered_matmul": ("QOrderedMatMul",),
}


_ORT_LOGGERS = ("onnxruntime.transformers", "fusion_attention", "fusion_embedlayer", "fusion_skiplayernorm")


def _fusion_options(config: FuseConfig, target: Target | None) -> Any:
    """onnxruntime's fusion switches for ``target`` (every fusion its op set allows) and the
    config, or None for onnxruntime's defaults."""
    if target is None and config.embed_layer_norm:
        return None
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(config.model_type)
    allowed = None if target is None else target.allowed_ms_ops()
    for switch, ops in _FUSION_OPS.items():
        if hasattr(options, switch) and allowed is not None and not set(ops) <= allowed:
            setattr(options, switch, False)
    if not config.embed_layer_norm:
        options.enable_embed_layer_norm = False
    return options


def fuse_proto(
    model: onnx.ModelProto, config: FuseConfig, scratch: Path | None = None, target: Target | None = None
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fuse a graph; returns the fused model and stats (counts per fusion, heads, node counts).
    With a ``target``, only the fusions whose ops it can run."""
    from onnxruntime.transformers.optimizer import optimize_model

    original, model = model, onnx.ModelProto()
    model.CopyFrom(original)
    pinned = pin_head_counts(model)
    num_heads, hidden = config.num_heads, config.hidden_size
    detected = False
    if num_heads <= 0 or hidden <= 0:
        found_heads, found_hidden = detect_attention_dims(model)
        num_heads = num_heads if num_heads > 0 else found_heads
        hidden = hidden if hidden > 0 else found_hidden
        detected = True
    before = fused_op_counts(model)
    # optimize_model logs through the root logger at WARNING for things that are not problems
    # for us (an unfused pooler); keep them at debug level.
    # Its fusion modules log under their own names too ("Input hidden size (288) is not same as
    # weight matrix dimension": true of every head-pruned layer, and harmless).
    ort_loggers = [logging.getLogger(name) for name in _ORT_LOGGERS]
    levels = [ort_logger.level for ort_logger in ort_loggers]
    for ort_logger in ort_loggers:
        ort_logger.setLevel(logging.ERROR)
    try:
        with in_scratch_dir(scratch):
            optimized = optimize_model(
                model,
                model_type=config.model_type,
                num_heads=num_heads,
                hidden_size=hidden,
                optimization_options=_fusion_options(config, target),
                opt_level=0,
            )
    except Exception as exc:
        raise UserError(
            f"onnxruntime's transformer optimizer failed: {' '.join(str(exc).split())[:300]}"
        ) from exc
    finally:
        for ort_logger, level in zip(ort_loggers, levels, strict=True):
            ort_logger.setLevel(level)
    fused = optimized.model
    if any(n.domain == MS_DOMAIN for n in fused.graph.node) and not any(
        o.domain == MS_DOMAIN for o in fused.opset_import
    ):
        fused.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    after = fused_op_counts(fused)
    stats: dict[str, Any] = {
        "fusions": {
            op: after.get(op, 0) - before.get(op, 0)
            for op in FUSED_OPS
            if after.get(op, 0) > before.get(op, 0)
        },
        "fused_ops": after,
        "num_heads": num_heads,
        "hidden_size": hidden,
        "dims_detected": detected,
        "head_counts_pinned": pinned,
        "nodes_before": len(model.graph.node),
        "nodes_after": len(fused.graph.node),
        "fully_fused": bool(after.get("Attention", 0) and after.get("SkipLayerNormalization", 0)),
    }
    return fused, stats


def check_same_outputs(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, atol: float, seed: int = 0
) -> float:
    """Max abs diff of output 0 on seeded random token ids (batch 2, 16 tokens, half a row masked)."""
    feeds = random_feeds(reference, 2, 16, seed, padded=True)
    diff = compare_outputs(reference, candidate, [feeds]).max_abs
    if not diff <= atol:
        raise ParityError(f"the fused graph differs from the input graph by {diff:.3g} (tolerance {atol:g})")
    return diff


class FusePass(SelfCheckingPass[onnx.ModelProto], FunctionalPass):
    def __init__(self, config: FuseConfig, ctx: PassContext) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    def call(self, model: ir.Model) -> PassReport:
        proto = ir.to_proto(model)
        fused, stats = fuse_proto(proto, self.config, self.ctx.scratch, self.ctx.target)
        if self.config.cpu_kernels:
            stats["cpu_kernels"] = prefer_cpu_kernels(fused)
        report = PassReport(ir.from_proto(fused), modified=bool(stats["fusions"]), stats=stats)
        return self.keep_for_check(proto, report)

    def ensures(self, model: ir.Model) -> None:
        """The fused graph computes what the input graph did, within ``atol``."""
        reference, report = self.kept_for_check()
        diff = check_same_outputs(reference, ir.to_proto(model), self.config.atol, self.ctx.seed)
        report.stats["max_abs_diff"] = diff
        logger.info("fuse: %s (max abs diff %.2g)", report.stats["fusions"] or "nothing fused", diff)


@register_pass("fuse", FuseConfig, order=1, data=(), emits=("com.microsoft",))
def make_fuse_pass(config: FuseConfig, ctx: PassContext) -> FusePass:
    return FusePass(config, ctx)
