"""Rule sets run as an onnx-ir pass, and the ``ModelProto`` boundary for callers that hold one.

:class:`RuleSetsPass` applies named rule sets of onnxscript's rewriter in order and reports how
often each fired. Its ``ensures()`` holds the rewrites' self-checks: the rules reached a fixed
point (no rule still matches, so nothing was left half-done), and no node or graph output reads
a value whose producer a rewrite removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PostconditionError
from onnxscript.rewriter import RewriteRuleSet

from trimformer.passes.base import PassReport

__all__ = ["RuleSetsPass", "apply_to_proto"]

logger = logging.getLogger(__name__)


class RuleSetsPass(InPlacePass):
    """Apply ``rule_sets`` (stat name -> rules) one after the other; stats: fired counts."""

    def __init__(self, rule_sets: dict[str, RewriteRuleSet]) -> None:
        super().__init__()
        self.rule_sets = rule_sets

    def call(self, model: ir.Model) -> PassReport:
        counts = {name: rules.apply_to_model(model) for name, rules in self.rule_sets.items()}
        logger.info("%s: %s", type(self).__name__, counts)
        return PassReport(model, any(counts.values()), stats=counts)

    def ensures(self, model: ir.Model) -> None:
        for graph in _graphs(model):
            for node in graph:
                for rules in self.rule_sets.values():
                    still = next((r for r in rules if r.match(model, graph, node)), None)
                    if still is not None:
                        raise PostconditionError(
                            f"rule {still} still matches node {node.name!r} after the pass"
                        )
        _ensure_nothing_dangles(model.graph)


def _graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    yield model.graph
    yield from model.functions.values()


def _ensure_nothing_dangles(graph: ir.Graph) -> None:
    """Every value a node or the graph output reads is still computed in the graph (a rewrite
    that removed its producer would leave it dangling)."""
    defined: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    defined.update(value for node in graph for value in node.outputs)
    for node in graph:
        for value in node.inputs:
            # Values of an enclosing scope (subgraphs) and absent optional inputs are not ours.
            if value is not None and value.graph is graph and value not in defined:
                raise PostconditionError(f"node {node.name!r} reads {value.name!r}, which nothing computes")
    missing = [v.name for v in graph.outputs if v not in defined]
    if missing:
        raise PostconditionError(f"graph outputs {missing} are no longer computed")


def apply_to_proto(the_pass: RuleSetsPass, model: onnx.ModelProto) -> dict[str, int]:
    """Run ``the_pass`` on an onnx-ir view of ``model`` and write the result back into ``model``
    in place when it changed anything (the ``ModelProto`` callers expect that); its counts."""
    report = the_pass(ir.from_proto(model))
    if report.modified:
        model.CopyFrom(ir.to_proto(report.model))
    return dict(report.stats) if isinstance(report, PassReport) else {}
