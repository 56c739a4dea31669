"""Deployment targets: one table of what each may run; ``auto`` follows the CPU; a graph with an op
its target lacks is named and refused; a VNNI build is not validated on a CPU without VNNI."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.formats.targets import (
    PRESET_TARGETS,
    TARGET_NAMES,
    TARGETS,
    built_for,
    check_graph,
    check_validating_cpu,
    ops_outside,
    target_for_cpu_class,
)
from trimformer.runtime.cpu import cpu_class


def _graph(op: str, domain: str, opset: int = 17) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports)


def test_every_target_is_named_and_the_presets_are_aliases() -> None:
    assert TARGET_NAMES == ("x86-vnni", "x86-avx2", "arm64", "wasm", "webgpu", "tensorrt", "auto")
    for preset, target in PRESET_TARGETS.items():
        assert TARGETS[target].quantize_preset == preset


@pytest.mark.parametrize(
    ("cpu", "target"),
    [("x86-vnni", "x86-vnni"), ("x86-avx2", "x86-avx2"), ("x86", "x86-avx2"), ("arm64", "arm64")],
)
def test_auto_is_the_target_of_the_cpu_class(cpu: str, target: str) -> None:
    assert target_for_cpu_class(cpu).name == target


def test_auto_on_an_unknown_cpu_asks_for_a_target() -> None:
    with pytest.raises(UserError, match="name one with --target"):
        target_for_cpu_class("other")


@pytest.mark.parametrize(
    ("op", "fits"),
    [
        ("QAttention", {"x86-vnni", "x86-avx2", "arm64", "wasm"}),
        ("MatMulIntegerToFloat", {"x86-vnni", "x86-avx2", "arm64", "wasm"}),
        ("EmbedLayerNormalization", {"x86-vnni", "x86-avx2", "arm64", "wasm"}),
        ("MatMulNBits", {"x86-vnni", "x86-avx2", "arm64", "wasm", "webgpu"}),
        ("SkipLayerNormalization", {"x86-vnni", "x86-avx2", "arm64", "wasm", "webgpu"}),
        ("NoSuchKernel", set()),
    ],
)
def test_which_targets_run_a_contrib_op(op: str, fits: set[str]) -> None:
    model = _graph(op, "com.microsoft")
    assert {name for name, target in TARGETS.items() if not ops_outside(model, target)} == fits


def test_standard_ops_fit_every_target_up_to_its_opset() -> None:
    assert all(not ops_outside(_graph("Relu", ""), target) for target in TARGETS.values())
    assert ops_outside(_graph("Relu", "", opset=21), TARGETS["tensorrt"]) == ["opset 21 (at most 20)"]


def test_a_graph_that_does_not_fit_is_refused_naming_the_op() -> None:
    with pytest.raises(UserError, match=r"com\.microsoft\.QAttention, which target webgpu cannot run"):
        check_graph(_graph("QAttention", "com.microsoft"), TARGETS["webgpu"], "the quantize pass")


def test_a_vnni_build_is_not_validated_without_vnni() -> None:
    with pytest.raises(UserError, match=r"without VNNI.*rebuild it with --target auto"):
        check_validating_cpu("x86-vnni", "x86-avx2", "work/int8")
    check_validating_cpu("x86-vnni", "x86-vnni", "work/int8")
    check_validating_cpu("x86-avx2", "x86-vnni", "work/int8")  # 7-bit weights run anywhere
    check_validating_cpu(None, "x86-avx2", "work/int8")  # built before targets existed


def test_built_for_is_the_last_targeted_step() -> None:
    assert built_for([{"pass": "prune", "target": "x86-avx2"}, {"pass": "fp16"}]) == "x86-avx2"
    assert built_for([{"pass": "export"}]) is None


def test_quantize_records_the_target_in_the_lineage_and_the_manifest(
    tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    args = ["--quiet", "quantize", str(tiny_bert_onnx), "--calibration", str(tiny_csv), "--samples", "8"]
    assert runner.invoke(cli, [*args, "--out", str(tmp_path / "auto")]).exit_code == 0
    step = ModelArtifact.open(tmp_path / "auto").meta.lineage[-1]
    assert step.params["target"] == target_for_cpu_class(cpu_class()).name
    validate = [
        "--quiet",
        "validate",
        str(tmp_path / "auto"),
        "--data",
        str(tiny_csv),
        "--out",
        str(tmp_path / "r"),
    ]
    assert runner.invoke(cli, validate).exit_code == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["target"] == step.params["target"]
    # Named explicitly, a VNNI build is made on any machine, and packaged with its target ...
    assert runner.invoke(cli, [*args, "--target", "x86-vnni", "--out", str(tmp_path / "vnni")]).exit_code == 0
    assert ModelArtifact.open(tmp_path / "vnni").meta.lineage[-1].params["preset"] == "cpu-vnni"
    assert (
        runner.invoke(
            cli, ["--quiet", "package", str(tmp_path / "vnni"), "--out", str(tmp_path / "b")]
        ).exit_code
        == 0
    )
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["target"] == "x86-vnni"
    # ... but validating it on a CPU without VNNI is refused in one line.
    monkeypatch.setattr("trimformer.validation.validate.cpu_class", lambda: "x86-avx2")
    result = runner.invoke(cli, ["--quiet", "validate", str(tmp_path / "vnni"), "--data", str(tiny_csv)])
    assert result.exit_code == 2 and "built for target x86-vnni" in result.output
    assert len(result.output.strip().splitlines()) == 1
