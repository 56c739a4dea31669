"""``fp16``: convert a model to float16, keeping numerically sensitive ops in float32.

Wraps onnxruntime's maintained converter (``onnxruntime.transformers.float16``). LayerNorm,
Softmax and (by default) the residual Adds that feed a LayerNorm stay float32: half precision
loses the small differences those ops amplify, and residual sums overflow fp16 on long inputs.
Inputs and outputs keep their types, so callers feed and read the same arrays as before. The
pass checks itself in ``ensures()``: the converted graph is run against the original on random
inputs.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Annotated

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass
from pydantic import Field

from trimformer.errors import ParityError, UserError
from trimformer.passes._checks import compare_outputs, random_feeds
from trimformer.passes.base import PassConfig, PassContext, PassReport, SelfCheckingPass, register_pass

__all__ = ["SENSITIVE_OPS", "Fp16Config", "Fp16Pass"]

logger = logging.getLogger(__name__)

SENSITIVE_OPS = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
)
_NORMS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"}


class Fp16Config(PassConfig):
    keep_io_types: bool = True
    keep_ops: list[str] = Field(default_factory=lambda: list(SENSITIVE_OPS))
    keep_residual_adds: bool = True
    # Largest allowed |fp16 - fp32| over the outputs on the self-check inputs.
    atol: float = Field(default=2e-2, gt=0)
    # (batch, sequence) shapes of the self-check inputs.
    check_shapes: list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] = Field(
        default_factory=lambda: [(2, 16), (1, 64)], min_length=1
    )


class Fp16Pass(SelfCheckingPass[onnx.ModelProto], FunctionalPass):
    def __init__(self, config: Fp16Config, ctx: PassContext) -> None:
        super().__init__()
        self.config = config
        self.ctx = ctx

    def requires(self, model: ir.Model) -> None:
        floats = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT]
        if not floats:
            raise UserError("fp16: the model has no float32 weights to convert (already fp16 or int8?)")

    def _residual_adds(self, proto: onnx.ModelProto) -> list[str]:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in proto.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        return [
            node.name
            for node in proto.graph.node
            if node.op_type == "Add" and any(c.op_type in _NORMS for c in consumers.get(node.output[0], []))
        ]

    def call(self, model: ir.Model) -> PassReport:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = ir.to_proto(model)
        for index, node in enumerate(proto.graph.node):
            if not node.name:
                node.name = f"{node.op_type}_{index}"
        blocked_nodes = self._residual_adds(proto) if self.config.keep_residual_adds else []
        converted = convert_float_to_float16(
            proto,
            keep_io_types=self.config.keep_io_types,
            op_block_list=list(self.config.keep_ops),
            node_block_list=blocked_nodes,
            disable_shape_infer=False,
        )
        kept = Counter(
            node.op_type
            for node in converted.graph.node
            if node.op_type in self.config.keep_ops or node.name in set(blocked_nodes)
        )
        fp16_weights = sum(1 for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        stats = {
            "fp16_initializers": fp16_weights,
            "kept_float32_ops": dict(kept),
            "kept_residual_adds": len(blocked_nodes),
        }
        return self.keep_for_check(proto, PassReport(ir.from_proto(converted), True, stats))

    def ensures(self, model: ir.Model) -> None:
        """The converted graph stays within ``atol`` of the float32 one on every check shape."""
        reference, report = self.kept_for_check()
        converted = ir.to_proto(model)
        worst = 0.0
        for index, (batch, seq) in enumerate(self.config.check_shapes):
            feeds = random_feeds(reference, batch, seq, seed=self.ctx.seed + index)
            diff = compare_outputs(reference, converted, [feeds], all_outputs=True).max_abs
            worst = max(worst, diff)
            if not np.isfinite(diff) or diff > self.config.atol:
                raise ParityError(
                    f"fp16: outputs differ from float32 by {diff:.3g} at {batch}x{seq} "
                    f"(tolerance {self.config.atol:g}); keep more ops in float32 or raise atol"
                )
        report.stats["max_abs_diff"] = worst
        logger.info(
            "fp16: %d weights in float16, kept %s in float32, max diff %.2g",
            report.stats["fp16_initializers"],
            report.stats["kept_float32_ops"],
            worst,
        )


@register_pass("fp16", Fp16Config, changes_weights=True, data=())
def _make(config: Fp16Config, ctx: PassContext) -> Fp16Pass:
    return Fp16Pass(config, ctx)
