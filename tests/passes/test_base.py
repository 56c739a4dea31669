"""The pass registry: each entry says what the runner needs (order, weights, data, operator
domains), and apply_pass holds a pass to what its entry declares."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
from onnx_ir.passes import InPlacePass, PassError

from trimformer.artifact import ModelArtifact
from trimformer.passes.base import (
    PASS_REGISTRY,
    PassConfig,
    PassContext,
    PassEntry,
    PassReport,
    apply_pass,
    pass_order,
    register_pass,
    weight_changing_passes,
)
from trimformer.passes.quantize.training_ranges import carries_training_ranges
from trimformer.pipeline.stages.params import (
    PassStageParams,
    PruneStageParams,
    QuantizeStageParams,
    stage_params_class,
)


def test_the_built_in_entries() -> None:
    assert pass_order() == {
        "prune": 0,
        "fuse": 1,
        "trim-vocab": 1,
        "quantize": 2,
        "fuse-decoder": 1,
        "weight-only": 2,
    }
    assert weight_changing_passes() == {"prune", "fp16", "weight-only"}
    assert PASS_REGISTRY["prune"].data == {"calibration", "source"}
    assert PASS_REGISTRY["trim-vocab"].data == {"corpus"}
    assert PASS_REGISTRY["prune"].emits == frozenset()
    assert PASS_REGISTRY["quantize"].emits == {"com.microsoft"}
    # Which graphs a pass knows: every encoder pass refuses a causal LM, weight-only an encoder.
    assert {name for name, e in PASS_REGISTRY.items() if e.models == "decoder"} == {
        "weight-only",
        "fuse-decoder",
    }


def test_stage_parameters_follow_the_entry() -> None:
    assert stage_params_class("prune") is PruneStageParams  # calibrates, scores nothing
    assert stage_params_class("quantize") is QuantizeStageParams  # its config counts its own rows
    assert stage_params_class("fp16") is PassStageParams
    assert stage_params_class("not-registered") is PassStageParams


def test_a_new_weight_changing_pass_drops_training_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "qat_ranges.json").write_text("{}")
    assert carries_training_ranges(tmp_path, ["export", "fuse"])
    monkeypatch.setitem(
        PASS_REGISTRY, "sparsify", PassEntry("sparsify", PassConfig, lambda c, x: None, changes_weights=True)
    )
    assert not carries_training_ranges(tmp_path, ["export", "sparsify"])


class _Contrib(InPlacePass):
    """Turns the first Add into a com.microsoft op (only the registry check is under test)."""

    def call(self, model: ir.Model) -> PassReport:
        node = next(n for n in model.graph if n.op_type == "Add")
        node.domain = "com.microsoft"
        node.op_type = "FastGelu"
        return PassReport(model, True)


def test_a_pass_that_writes_an_undeclared_domain_is_stopped(
    tmp_path: Path, tiny_bert_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PASS_REGISTRY, "contrib", PASS_REGISTRY.get("contrib"))  # restored after
    register_pass("contrib", PassConfig)(lambda config, ctx: _Contrib())
    with pytest.raises(PassError, match=r"the contrib pass wrote operators of com\.microsoft"):
        apply_pass(ModelArtifact.open(tiny_bert_onnx), "contrib", PassConfig(), PassContext(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    register_pass("contrib", PassConfig, emits=("com.microsoft",))(lambda config, ctx: _Contrib())
    artifact, _ = apply_pass(
        ModelArtifact.open(tiny_bert_onnx), "contrib", PassConfig(), PassContext(), tmp_path / "b"
    )
    assert any(n.domain == "com.microsoft" for n in artifact.load_model().graph.node)


def test_unknown_data_kinds_are_a_registration_error() -> None:
    with pytest.raises(ValueError, match="unknown data \\['labels'\\]"):
        register_pass("x", PassConfig, data=("labels",))
