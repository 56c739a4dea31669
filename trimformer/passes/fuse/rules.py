"""Pattern / check / rewrite rules (onnxscript's rewriter on onnx-ir) that pick faster onnxruntime
CPU kernels for the same arithmetic; ``cpu_kernels.py`` says why each one pays and applies them.

- :class:`FoldBiasGelu`: ``MatMulIntegerToFloat -> BiasGelu(bias)`` becomes
  ``MatMulIntegerToFloat(bias) -> Gelu``.
- :class:`SplitSkipLayerNorm`: ``SkipLayerNormalization`` becomes ``Sum -> LayerNormalization``,
  the bias moving into the int8 matmul that produces ``x`` (else ``skip``) where it can.
- :class:`BoundMaskFilter`: fused (Q)Attention without ``mask_filter_value`` gets one.
- :class:`FuseMatMulIntegerToFloat`: ``MatMulInteger -> Cast -> Mul(Mul(a_scale, w_scale))``
  becomes one ``MatMulIntegerToFloat`` (onnxruntime fuses it only for dynamic scales).

A rule's ``check`` returns the reason it does not fire; the rewriter binds ``pattern``, ``check``
and ``rewrite`` parameters by the names of the pattern's variables, which is why each overrides
the base signature (``type: ignore[override]``); the rewrites keep node names (the quantize
pass finds its integer nodes by name) and the names and types of the values they re-create.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import MatchContext, MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.pattern import Var

__all__ = [
    "MASK_FILTER_VALUE",
    "MS_DOMAIN",
    "BoundMaskFilter",
    "FoldBiasGelu",
    "FuseMatMulIntegerToFloat",
    "SplitSkipLayerNorm",
    "bias_gelu_rules",
    "integer_matmul_rules",
    "mask_filter_rules",
    "skip_layer_norm_rules",
]

MS_DOMAIN = "com.microsoft"
MASK_FILTER_VALUE = -50.0
# LayerNormalization (the ONNX op the split writes) exists from opset 17.
_LAYER_NORM_OPSET = 17
# SkipLayerNormalization's epsilon when the attribute is absent (onnxruntime's default).
_SKIP_LN_EPSILON = 1e-12
# MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?)
_MATMUL_BIAS_INPUT = 6
# Attention and QAttention have at most two outputs (output, present).
_ATTENTION_OUTPUTS = (2, 1)


def _optional(name: str) -> Var:
    """A pattern variable that also matches an absent optional input (bound to None)."""
    return Var(name, can_match_none=True)


def _int8_matmul(op: Any, a: Any, b: Any, a_scale: Any, b_scale: Any) -> Any:
    """``MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?)``
    with its output bound as ``matmul_out``; ``matmul_bias`` is None when it has no bias."""
    zero_points = _optional("a_zp"), _optional("b_zp")
    return op.MatMulIntegerToFloat(
        a,
        b,
        a_scale,
        b_scale,
        *zero_points,
        _optional("matmul_bias"),
        _domain=MS_DOMAIN,
        _outputs=["matmul_out"],
    )


def _producer(value: ir.Value) -> ir.Node:
    """The node a matched pattern output comes from (always there: the pattern matched it)."""
    node = value.producer()
    assert node is not None
    return node


def _takes_bias(
    matmul_out: ir.Value | None, matmul_bias: ir.Value | None, bias: ir.Value | None
) -> MatchResult:
    """The int8 matmul can absorb ``bias``: its own bias input is free and its output has one
    reader (the node being rewritten) and is no graph output."""
    result = MatchResult()
    if matmul_out is None:
        return result.fail("no int8 matmul in the match")
    if bias is None:
        return result.fail("no bias to move")
    if matmul_bias is not None:
        return result.fail("the int8 matmul already has a bias", matmul_bias)
    if len(matmul_out.uses()) != 1 or matmul_out.is_graph_output():
        return result.fail("the int8 matmul's output has other readers", matmul_out)
    return result


def _int8_matmul_with_bias(op: Any, matmul_out: ir.Value, bias: ir.Value) -> ir.Value:
    """The matched int8 matmul again, with ``bias`` as its bias input, under its old names."""
    old = _producer(matmul_out)
    # Its six first inputs, the absent trailing zero points as None.
    inputs = [*old.inputs[:_MATMUL_BIAS_INPUT], *[None] * (_MATMUL_BIAS_INPUT - len(old.inputs))]
    new = op.MatMulIntegerToFloat(
        *inputs,
        bias,
        _domain=MS_DOMAIN,
        _name=old.name,
        _outputs=[matmul_out.name or ""],
        **old.attributes,
    )
    new.type, new.shape = matmul_out.type, matmul_out.shape
    return new


class FoldBiasGelu(RewriteRuleClassBase):
    """``BiasGelu(MatMulIntegerToFloat(...), bias)`` -> ``Gelu(MatMulIntegerToFloat(..., bias))``."""

    def pattern(self, op: Any, a: Var, b: Var, a_scale: Var, b_scale: Var, bias: Var) -> Any:  # type: ignore[override]
        matmul = _int8_matmul(op, a, b, a_scale, b_scale)
        return op.BiasGelu(matmul, bias, _domain=MS_DOMAIN, _outputs=["gelu_out"])

    def check(  # type: ignore[override]
        self,
        context: MatchContext,
        matmul_out: ir.Value,
        matmul_bias: ir.Value | None,
        bias: ir.Value | None,
        **_: Any,
    ) -> MatchResult:
        return _takes_bias(matmul_out, matmul_bias, bias)

    def rewrite(  # type: ignore[override]
        self, op: Any, matmul_out: ir.Value, bias: ir.Value, gelu_out: ir.Value, **_: Any
    ) -> ir.Value:
        gelu = _producer(gelu_out)
        biased = _int8_matmul_with_bias(op, matmul_out, bias)
        return op.Gelu(biased, _domain=MS_DOMAIN, _name=gelu.name, **gelu.attributes)


class SplitSkipLayerNorm(RewriteRuleClassBase):
    """``SkipLayerNormalization(x, skip, gamma, beta?, bias?)`` -> ``LayerNormalization(Sum(x,
    skip, bias?), gamma, beta?)``; with ``bias_into`` = "x" or "skip", only where that input comes
    from an int8 matmul that absorbs the bias (those rules run before the plain one)."""

    def __init__(self, bias_into: str | None = None) -> None:
        super().__init__(name=f"SplitSkipLayerNorm_bias_into_{bias_into}" if bias_into else None)
        self.bias_into = bias_into

    def pattern(  # type: ignore[override]
        self, op: Any, a: Var, b: Var, a_scale: Var, b_scale: Var, x: Any, skip: Any, gamma: Var
    ) -> Any:
        if self.bias_into == "x":
            x = _int8_matmul(op, a, b, a_scale, b_scale)
        elif self.bias_into == "skip":
            skip = _int8_matmul(op, a, b, a_scale, b_scale)
        beta, bias = _optional("beta"), _optional("bias")
        # One output: a node whose mean / inv_std / sum outputs are read elsewhere is not removable.
        return op.SkipLayerNormalization(
            x, skip, gamma, beta, bias, _domain=MS_DOMAIN, _outputs=["normalized"]
        )

    def check(  # type: ignore[override]
        self,
        context: MatchContext,
        bias: ir.Value | None,
        matmul_out: ir.Value | None = None,
        matmul_bias: ir.Value | None = None,
        **_: Any,
    ) -> MatchResult:
        result = MatchResult()
        opset = context.model.opset_imports.get("", context.model.opset_imports.get("ai.onnx", 0))
        if opset < _LAYER_NORM_OPSET:
            return result.fail(f"LayerNormalization needs opset {_LAYER_NORM_OPSET}, the model has {opset}")
        if self.bias_into is not None:
            return _takes_bias(matmul_out, matmul_bias, bias)
        return result

    def rewrite(  # type: ignore[override]
        self,
        op: Any,
        x: ir.Value | None,
        skip: ir.Value | None,
        gamma: ir.Value,
        beta: ir.Value | None,
        bias: ir.Value | None,
        normalized: ir.Value,
        matmul_out: ir.Value | None = None,
        **_: Any,
    ) -> ir.Value:
        node = _producer(normalized)
        terms = [x, skip]
        if matmul_out is not None and bias is not None:  # check(): an int8 matmul takes the bias
            moved = _int8_matmul_with_bias(op, matmul_out, bias)
            terms[0 if self.bias_into == "x" else 1] = moved
        elif bias is not None:
            terms.append(bias)
        # Sum, not Add: onnxruntime's SkipLayerNormFusion would turn Add + LayerNorm back into
        # the slow kernel, and it matches only Add.
        summed = op.Sum(
            *terms,
            _name=f"{node.name}_sum" if node.name else None,
            _outputs=[f"{node.name}_residual_sum" if node.name else ""],
        )
        epsilon = node.attributes.get_float("epsilon", _SKIP_LN_EPSILON)
        ln_inputs = [summed, gamma] + ([beta] if beta is not None else [])
        return op.LayerNormalization(*ln_inputs, axis=-1, epsilon=epsilon, _name=node.name)


class BoundMaskFilter(RewriteRuleClassBase):
    """Fused ``op_type`` (Attention or QAttention) with ``outputs`` outputs and no
    ``mask_filter_value``: the same node with ``mask_filter_value = value``."""

    def __init__(self, op_type: str, outputs: int, value: float = MASK_FILTER_VALUE) -> None:
        super().__init__(name=f"BoundMaskFilter_{op_type}_{outputs}")
        self.op_type, self.outputs, self.value = op_type, outputs, float(value)

    def pattern(self, op: Any) -> Any:  # type: ignore[override]
        names = [f"out{i}" for i in range(self.outputs)]
        return getattr(op, self.op_type)(_domain=MS_DOMAIN, _allow_other_inputs=True, _outputs=names)

    def check(self, context: MatchContext, out0: ir.Value, **_: Any) -> MatchResult:  # type: ignore[override]
        node = _producer(out0)
        if len(node.outputs) != self.outputs:
            return MatchResult().fail(f"the node has {len(node.outputs)} outputs, not {self.outputs}", node)
        if "mask_filter_value" in node.attributes:
            return MatchResult().fail("mask_filter_value is already set", node)
        return MatchResult()

    def rewrite(self, op: Any, out0: ir.Value, **_: Any) -> Any:  # type: ignore[override]
        node = _producer(out0)
        return op.op(
            self.op_type,
            *node.inputs,
            _domain=MS_DOMAIN,
            _name=node.name,
            _outputs=[v.name or "" for v in node.outputs],
            **node.attributes,
            mask_filter_value=self.value,
        )


class FuseMatMulIntegerToFloat(RewriteRuleClassBase):
    """``Mul(Cast(MatMulInteger(A, B, a_zp?, b_zp?)), Mul(a_scale, b_scale))`` (either operand
    order) -> ``MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zp?, b_zp?)``. The matched chain
    must be read by nothing else (the rewriter checks that before removing it)."""

    def __init__(self, scales_first: bool) -> None:
        super().__init__(name=f"FuseMatMulIntegerToFloat{'_scales_first' if scales_first else ''}")
        self.scales_first = scales_first

    def pattern(self, op: Any, a: Var, b: Var, a_scale: Var, b_scale: Var) -> Any:  # type: ignore[override]
        integer = op.MatMulInteger(a, b, _optional("a_zp"), _optional("b_zp"), _outputs=["integer_out"])
        product = op.Cast(integer)
        scales = op.Mul(a_scale, b_scale)
        return op.Mul(scales, product) if self.scales_first else op.Mul(product, scales)

    def rewrite(  # type: ignore[override]
        self,
        op: Any,
        a: ir.Value,
        b: ir.Value,
        a_zp: ir.Value | None,
        b_zp: ir.Value | None,
        a_scale: ir.Value,
        b_scale: ir.Value,
        integer_out: ir.Value,
    ) -> ir.Value:
        inputs = [a, b, a_scale, b_scale, a_zp, b_zp]
        while inputs[-1] is None:
            inputs.pop()
        return op.MatMulIntegerToFloat(*inputs, _domain=MS_DOMAIN, _name=_producer(integer_out).name)


def bias_gelu_rules() -> RewriteRuleSet:
    return RewriteRuleSet([FoldBiasGelu.rule()])


def skip_layer_norm_rules() -> RewriteRuleSet:
    # In this order: the bias goes into x's int8 matmul, else skip's, else into the Sum.
    return RewriteRuleSet([SplitSkipLayerNorm.rule(into) for into in ("x", "skip", None)])


def mask_filter_rules(value: float = MASK_FILTER_VALUE) -> RewriteRuleSet:
    return RewriteRuleSet(
        [BoundMaskFilter.rule(op, n, value) for op in ("Attention", "QAttention") for n in _ATTENTION_OUTPUTS]
    )


def integer_matmul_rules() -> RewriteRuleSet:
    return RewriteRuleSet([FuseMatMulIntegerToFloat.rule(first) for first in (False, True)])
