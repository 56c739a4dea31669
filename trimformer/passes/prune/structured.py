"""The ``prune`` pass: structured removal of attention heads and feed-forward neurons.

Post-training, after Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers"):
score every head and neuron (:mod:`.importance`), choose what to remove under a budget
(:mod:`.budget`), remove it from the graph as coupled groups (:mod:`.surgery`), then
refit the kept rows of each layer's projections on calibration data (:mod:`.reconstruct`). The
pass's ``ensures()`` checks that the graph after surgery equals the unpruned graph with the same
units masked, and that reconstruction changed values only.

Fisher scores need PyTorch gradients, so they are computed outside ``passes/``
(``trimformer.training.fisher``) and handed in as ``ctx.importance_scores``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass
from pydantic import Field, model_validator

from trimformer.errors import ParityError, UserError
from trimformer.formats.pruning_record import RECORD_FORMAT
from trimformer.passes._checks import compare_outputs, random_feeds
from trimformer.passes.base import (
    PassConfig,
    PassContext,
    PassReport,
    SelfCheckingPass,
    iter_feeds,
    register_pass,
)
from trimformer.passes.graph import EncoderLayout, find_blocks
from trimformer.passes.prune.budget import Budget, layer_costs, select_plan
from trimformer.passes.prune.importance import (
    Scores,
    ablation_scores,
    activation_scores,
    magnitude_scores,
)
from trimformer.passes.prune.reconstruct import (
    ReconstructionStep,
    reconstruct,
    reconstruction_units,
)
from trimformer.passes.prune.surgery import LayerPlan, apply_plan

__all__ = ["PruneConfig", "PrunePass", "build_record", "layout_stats", "plan_from_scores"]

logger = logging.getLogger(__name__)

ImportanceKind = Literal["auto", "magnitude", "activation", "fisher", "ablation"]
_FRACTION = "a fraction in [0, 1) to remove"
EXACT_ATOL = 1e-4


class PruneConfig(PassConfig):
    """What to remove (fractions in [0, 1)) and how to choose and recover."""

    heads: float | None = Field(default=None, ge=0.0, lt=1.0, description=_FRACTION)
    ffn: float | None = Field(default=None, ge=0.0, lt=1.0, description=_FRACTION)
    flops: float | None = Field(default=None, ge=0.0, lt=1.0, description=_FRACTION)
    params: float | None = Field(default=None, ge=0.0, lt=1.0, description=_FRACTION)
    importance: ImportanceKind = "auto"
    reconstruct: bool = True
    min_heads: int = Field(default=0, ge=0)
    min_neurons: int = Field(default=0, ge=0)
    # Sequence length at which FLOPs are counted (attention scores grow with it).
    seq_len: int = Field(default=128, ge=1)
    ridge: float = Field(default=1e-2, ge=0.0)
    # "rows": refit the kept projection rows; "scales": one scale per kept head/neuron (Kwon et al.).
    reconstruct_mode: Literal["rows", "scales"] = "rows"
    # With a PyTorch source: Adam steps per layer of block reconstruction after the ridge refit
    # (trimformer.training.block_reconstruct); 0 keeps the ridge refit alone.
    block_steps: int = Field(default=240, ge=0, description="0 or more steps per layer (--block-steps)")
    block_lr: float = Field(default=1e-3, gt=0.0)

    @model_validator(mode="after")
    def _one_budget(self) -> PruneConfig:
        given = [n for n in ("heads", "ffn", "flops", "params") if getattr(self, n) is not None]
        if not given:
            raise ValueError(
                "nothing to prune: give --heads, --ffn, --flops or --params (fractions to remove)"
            )
        if {"flops", "params"} & set(given) and len(given) > 1:
            raise ValueError(
                f"--flops/--params is one global target; do not combine it with {', '.join(given)}"
            )
        return self

    def check(self) -> None:
        """Validate again (a config changed with ``model_copy`` skips validation); a UserError."""
        type(self)(**self.model_dump())

    def budget(self) -> Budget:
        return Budget(self.heads, self.ffn, self.flops, self.params, self.min_heads, self.min_neurons)


def resolve_importance(kind: str, has_calibration: bool, has_fisher: bool) -> str:
    if kind == "auto":
        return "fisher" if has_fisher else ("activation" if has_calibration else "magnitude")
    return kind


def _scores(kind: str, proto: onnx.ModelProto, layout: EncoderLayout, ctx: PassContext) -> Scores:
    if kind == "magnitude":
        return magnitude_scores(layout)
    if kind == "fisher":
        data = ctx.importance_scores
        if data is None:
            raise UserError("fisher importance needs the PyTorch model: pass --source PYTORCH_DIR")
        scores = Scores(
            [np.asarray(h, dtype=np.float64) for h in data["heads"]],
            [np.asarray(n, dtype=np.float64) for n in data["neurons"]],
        )
        for layer, h, n in zip(layout.layers, scores.heads, scores.neurons, strict=False):
            if h.shape != (layer.attention.num_heads,) or n.shape != (layer.ffn.size,):
                raise UserError(
                    "the Fisher scores do not match the graph's heads/neurons; is --source the right model?"
                )
        if len(scores.heads) != len(layout.layers):
            raise UserError(
                "the Fisher scores do not match the graph's layer count; is --source the right model?"
            )
        return scores
    calibration = ctx.require_calibration(f"prune (importance {kind})")
    if kind == "activation":
        return activation_scores(proto, layout, calibration)
    classify = proto.graph.output[0].name == "logits"
    return ablation_scores(proto, layout, calibration, classify)


def plan_from_scores(
    layout: EncoderLayout, scores: Scores, config: PruneConfig, kind: str
) -> list[LayerPlan]:
    return select_plan(layout, scores, config.budget(), config.seq_len, comparable=kind == "fisher")


def layout_stats(layout: EncoderLayout, plan: list[LayerPlan] | None, seq_len: int) -> dict[str, Any]:
    """Per-layer kept heads/neurons, encoder FLOPs (per sequence of ``seq_len``) and parameters."""
    costs = layer_costs(layout.hidden_size, layout.head_dim, seq_len)
    rows = []
    for i, layer in enumerate(layout.layers):
        heads = layer.attention.num_heads if plan is None else len(plan[i].kept_heads)
        neurons = layer.ffn.size if plan is None else len(plan[i].kept_neurons)
        h = layout.hidden_size
        # Branch biases (output / down projection) stay even when a branch is removed.
        rows.append(
            {
                "layer": i,
                "heads": heads,
                "neurons": neurons,
                "flops": heads * costs.head_flops + neurons * costs.neuron_flops,
                "params": heads * costs.head_params + neurons * costs.neuron_params + 2 * h,
            }
        )
    return {
        "layers": rows,
        "flops": float(sum(r["flops"] for r in rows)),
        "params": int(sum(r["params"] for r in rows)),
        "heads": int(sum(r["heads"] for r in rows)),
        "neurons": int(sum(r["neurons"] for r in rows)),
    }


def build_record(
    layout: EncoderLayout, plan: list[LayerPlan], architecture: str, importance: str, source_hash: str
) -> dict[str, Any]:
    """The replayable record (indices refer to the graph pruned, i.e. the original model)."""
    layers = []
    for layer, step in zip(layout.layers, plan, strict=True):
        kept_h, kept_n = list(step.kept_heads), list(step.kept_neurons)
        layers.append(
            {
                "layer": layer.index,
                "num_heads": layer.attention.num_heads,
                "ffn_size": layer.ffn.size,
                "kept_heads": kept_h,
                "removed_heads": [h for h in range(layer.attention.num_heads) if h not in set(kept_h)],
                "kept_neurons": kept_n,
                "removed_neurons": [n for n in range(layer.ffn.size) if n not in set(kept_n)],
            }
        )
    return {
        "format": RECORD_FORMAT,
        "architecture": architecture,
        "num_layers": len(layout.layers),
        "num_heads": layout.num_heads,
        "head_dim": layout.head_dim,
        "hidden_size": layout.hidden_size,
        "ffn_size": layout.ffn_size,
        "importance": importance,
        "layers": layers,
        "source_model_hash": source_hash,
    }


# -- the exactness self-check --------------------------------------------------------------------
def _masked_reference(
    proto: onnx.ModelProto, layout: EncoderLayout, plan: list[LayerPlan]
) -> onnx.ModelProto:
    """The unpruned graph with the plan's removed heads and neurons multiplied by zero."""
    model = ir.from_proto(proto)
    by_output = {node.outputs[0].name: node for node in model.graph if node.outputs}
    for layer, step in zip(layout.layers, plan, strict=True):
        attn, ffn = layer.attention, layer.ffn
        for matmul_name, width, group, kept in (
            (attn.out.matmul.outputs[0].name, attn.num_heads * attn.head_dim, attn.head_dim, step.kept_heads),
            (ffn.down.matmul.outputs[0].name, ffn.size, 1, step.kept_neurons),
        ):
            mask = np.zeros(width, dtype=np.float32)
            for unit in kept:
                mask[unit * group : (unit + 1) * group] = 1.0
            node = by_output[matmul_name]
            name = f"{matmul_name}_verify_mask"
            value = ir.Value(name=name, const_value=ir.tensor(mask, name=name))
            model.graph.register_initializer(value)
            mul = ir.Node("", "Mul", [node.inputs[0], value], name=name + "_mul")
            model.graph.insert_before(node, mul)
            node.replace_input_with(0, mul.outputs[0])
    return ir.to_proto(model)


def _probe_feeds(proto: onnx.ModelProto, ctx: PassContext) -> list[dict[str, np.ndarray]]:
    """Two calibration batches, else seeded random inputs with a padded row."""
    feeds: list[dict[str, np.ndarray]] = []
    if ctx.calibration is not None:
        for feed in iter_feeds(ctx.calibration()):
            feeds.append(feed)
            if len(feeds) == 2:
                break
    return feeds or [random_feeds(proto, 2, 9, ctx.seed, padded=True)]


def verify_exact(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    layout: EncoderLayout,
    plan: list[LayerPlan],
    ctx: PassContext,
) -> float:
    """Max abs difference between the pruned graph and the masked unpruned one; raises past 1e-4."""
    return _ensure_exact(_masked_reference(original, layout, plan), pruned, ctx)


def _ensure_exact(reference: onnx.ModelProto, pruned: onnx.ModelProto, ctx: PassContext) -> float:
    worst = compare_outputs(reference, pruned, _probe_feeds(reference, ctx)).max_abs
    if not worst <= EXACT_ATOL:
        raise ParityError(
            f"pruning changed the outputs by {worst:.2e} beyond masking the removed units; please report this graph"
        )
    return worst


@dataclass(frozen=True)
class _ExactnessCheck:
    """What ``ensures()`` checks: the graph right after surgery must equal the masked unpruned
    graph, and reconstruction may then change constants' values, never the graph's structure."""

    reference: onnx.ModelProto
    surgery: onnx.ModelProto


def _structure(model: onnx.ModelProto) -> list[tuple[str, tuple[tuple[int, ...] | None, ...]]]:
    """Each node's op type and the shapes of its constant inputs, in order."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [(node.op_type, tuple(shapes.get(name) for name in node.input)) for node in model.graph.node]


class PrunePass(SelfCheckingPass[_ExactnessCheck], FunctionalPass):
    """Remove heads and neurons; returns the pruned model with stats (plan, record, errors)."""

    def __init__(self, config: PruneConfig, ctx: PassContext) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.ctx = ctx

    def call(self, model: ir.Model) -> PassReport:
        started = time.perf_counter()
        config, ctx = self.config, self.ctx
        original = ir.to_proto(model)
        try:  # block checks read attention-bias shapes; graphs saved by optimizers may lack them
            original = onnx.shape_inference.infer_shapes(original, strict_mode=False, data_prop=True)
        except Exception as exc:
            logger.debug("shape inference before pruning failed: %s", exc)
        work = ir.from_proto(original)
        layout = find_blocks(work.graph)
        kind = resolve_importance(
            config.importance, ctx.calibration is not None, ctx.importance_scores is not None
        )
        if config.reconstruct and ctx.calibration is None:
            raise UserError(
                "reconstruction needs calibration data: pass --calibration DATA (or --no-reconstruct)"
            )
        scores = _scores(kind, original, layout, ctx)
        scored = time.perf_counter()
        plan = plan_from_scores(layout, scores, config, kind)
        units = reconstruction_units(layout, plan)
        before = layout_stats(layout, None, config.seq_len)
        after = layout_stats(layout, plan, config.seq_len)
        stats: dict[str, Any] = {
            "importance": kind,
            "layout": layout.describe(),
            "seq_len": config.seq_len,
            "before": before,
            "after": after,
        }
        apply_plan(work, layout, plan)
        pruned = ir.to_proto(work)
        try:
            pruned = onnx.shape_inference.infer_shapes(pruned, strict_mode=False, data_prop=True)
        except Exception as exc:  # shapes are a convenience; onnxruntime infers its own
            logger.debug("shape inference after pruning failed: %s", exc)
        check = _ExactnessCheck(_masked_reference(original, layout, plan), pruned)
        steps: list[ReconstructionStep] = []
        if config.reconstruct:
            calibration = ctx.require_calibration("prune (reconstruction)")
            pruned, steps = reconstruct(
                original, pruned, units, calibration, alpha=config.ridge, mode=config.reconstruct_mode
            )
        record = build_record(layout, plan, ctx.architecture or "unknown", kind, ctx.source_model_hash or "")
        stats.update(
            flops_removed=round(1 - after["flops"] / before["flops"], 4),
            params_removed=round(1 - after["params"] / before["params"], 4),
            reconstruction=[s.to_dict() for s in steps],
            scores=scores.to_dict(),
            record=record,
            seconds={
                "importance": round(scored - started, 2),
                "total": round(time.perf_counter() - started, 2),
            },
        )
        logger.info(
            "pruned %d/%d heads and %d/%d neurons (%.0f%% of encoder FLOPs) with %s importance",
            before["heads"] - after["heads"],
            before["heads"],
            before["neurons"] - after["neurons"],
            before["neurons"],
            100 * stats["flops_removed"],
            kind,
        )
        return self.keep_for_check(check, PassReport(ir.from_proto(pruned), True, stats))

    def ensures(self, model: ir.Model) -> None:
        """Surgery removed exactly the planned units (its graph equals the unpruned one with them
        masked), and reconstruction changed only the values of the kept rows."""
        check, report = self.kept_for_check()
        if _structure(ir.to_proto(model)) != _structure(check.surgery):
            raise ParityError("reconstruction changed the pruned graph's structure; please report this graph")
        report.stats["exactness_max_abs_diff"] = _ensure_exact(check.reference, check.surgery, self.ctx)


@register_pass("prune", PruneConfig, order=0, changes_weights=True, data=("calibration", "source"))
def make_prune_pass(config: PruneConfig, ctx: PassContext) -> PrunePass:
    return PrunePass(config, ctx)
