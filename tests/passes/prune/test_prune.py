"""Structured pruning: exactness against masking, replay on PyTorch, budgets, CLI, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trimformer.cli.commands  # noqa: F401  (registers the commands)
from tests.builders import make_hf_model, make_plain_model
from trimformer.artifact import ModelArtifact
from trimformer.cli.main import cli
from trimformer.errors import UserError
from trimformer.exporters import export_model, random_feeds
from trimformer.formats.pruning_record import load_pruning_record
from trimformer.passes.base import PassContext
from trimformer.passes.graph import find_blocks
from trimformer.passes.prune.structured import PruneConfig, PrunePass
from trimformer.sources import load_source
from trimformer.sources.pruning import apply_pruning_record, mask_model

ATOL = 1e-5


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _prune_proto(
    path: Path, config: PruneConfig, ctx: PassContext | None = None
) -> tuple[onnx.ModelProto, dict]:
    model = ir.from_proto(onnx.load(str(path)))
    report = PrunePass(config, ctx or PassContext(architecture="test"))(model)
    return ir.to_proto(report.model), report.stats


def _torch_out(module: torch.nn.Module, names: tuple[str, ...], feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(feeds[n]) for n in names)).numpy()


def _check_exact(
    folder: Path, onnx_path: Path, proto: onnx.ModelProto, record: dict, vocab: int = 60
) -> None:
    """Pruned graph == unpruned PyTorch model with the same units masked; replay == pruned graph."""
    source = load_source(folder)
    session = _session(proto)
    replayed = copy.deepcopy(source.module)
    replay_model = replayed.model if hasattr(replayed, "model") else replayed
    apply_pruning_record(replay_model, record)
    for batch, seq in ((1, 5), (3, 17)):
        feeds = random_feeds(source.io.input_names, batch, seq, vocab, seed=batch * seq)
        feeds["attention_mask"][-1, seq - 2 :] = 0
        got = session.run(None, {n: feeds[n] for n in source.io.input_names})[0]
        with mask_model(source.model, record):
            expected = _torch_out(source.module, source.io.input_names, feeds)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(_torch_out(replayed, source.io.input_names, feeds), got, atol=ATOL, rtol=0)


def _perturb(folder: Path, kind: str) -> None:
    """Random init gives near-uniform attention; larger weights make every head matter."""
    source = load_source(folder)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    if kind == "plain":
        source.model.save(folder)
    else:
        source.model.save_pretrained(str(folder))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["bert", "distilbert", "roberta", "plain"]),
    layers=st.integers(1, 2),
    heads=st.sampled_from([2, 4]),
    head_ratio=st.floats(0.0, 0.99),
    ffn_ratio=st.floats(0.0, 0.99),
)
def test_pruned_graph_equals_masked_model(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    layers: int,
    heads: int,
    head_ratio: float,
    ffn_ratio: float,
) -> None:
    base = tmp_path_factory.mktemp(kind)
    hidden, ffn = heads * 8, 24
    if kind == "plain":
        make_plain_model(base / "src", layers=layers, hidden=hidden, heads=heads, ffn=ffn, seed=layers)
    else:
        make_hf_model(
            base / "src", model_type=kind, layers=layers, hidden=hidden, heads=heads, ffn=ffn, seed=heads
        )
    _perturb(base / "src", kind)
    export_model(base / "src", base / "onnx")
    config = PruneConfig(heads=head_ratio, ffn=ffn_ratio, importance="magnitude", reconstruct=False)
    if head_ratio == 0 and ffn_ratio == 0:
        config = PruneConfig(heads=0.5, importance="magnitude", reconstruct=False)
    proto, stats = _prune_proto(base / "onnx" / "model.onnx", config)
    record = stats["record"]
    assert stats["after"]["heads"] == stats["before"]["heads"] - int(
        np.floor(config.heads * layers * heads + 1e-9)
    )
    _check_exact(base / "src", base / "onnx" / "model.onnx", proto, record)


def test_fused_attention_is_pruned_exactly(tiny_bert: Path, tiny_bert_onnx: Path, tmp_path: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(tiny_bert_onnx / "model.onnx"), model_type="bert", num_heads=4, hidden_size=32)
    assert fused.get_fused_operator_statistics()["Attention"] == 2
    path = tmp_path / "fused.onnx"
    fused.save_model_to_file(str(path))
    layout = find_blocks(ir.from_proto(onnx.load(str(path))).graph)
    assert layout.fused and [layer.attention.num_heads for layer in layout.layers] == [4, 4]
    proto, stats = _prune_proto(
        path, PruneConfig(heads=0.75, ffn=0.5, importance="magnitude", reconstruct=False)
    )
    kinds = {n.op_type for n in proto.graph.node}
    assert stats["after"]["heads"] == 2
    assert "Attention" in kinds or stats["after"]["layers"][0]["heads"] == 0
    _check_exact(tiny_bert, path, proto, stats["record"])


def test_whole_branch_removal_keeps_residual(tiny_plain: Path, tiny_plain_onnx: Path) -> None:
    model = ir.from_proto(onnx.load(str(tiny_plain_onnx / "model.onnx")))
    layout = find_blocks(model.graph)
    from trimformer.passes.prune.structured import build_record
    from trimformer.passes.prune.surgery import LayerPlan, apply_plan

    plan = [LayerPlan((), tuple(range(0, 64, 2))), LayerPlan((1, 3), ())]
    apply_plan(model, layout, plan)
    proto = ir.to_proto(model)
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 1  # layer 0's attention is gone
    _check_exact(
        tiny_plain, tiny_plain_onnx / "model.onnx", proto, build_record(layout, plan, "plain", "test", "")
    )


def test_graph_without_blocks_is_refused() -> None:
    graph = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 4] y) {
            w = Constant <value = float[4, 4] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
            y = MatMul(x, w)
        }"""
    )
    with pytest.raises(UserError, match="looked for attention blocks"):
        find_blocks(ir.from_proto(graph).graph)


def test_flops_budget_and_minimums(tiny_bert_onnx: Path) -> None:
    path = tiny_bert_onnx / "model.onnx"
    _, stats = _prune_proto(
        path, PruneConfig(flops=0.5, importance="magnitude", reconstruct=False, min_heads=1)
    )
    assert 0.5 <= stats["flops_removed"] < 0.56
    assert all(row["heads"] >= 1 for row in stats["after"]["layers"])
    _, stats = _prune_proto(path, PruneConfig(params=0.3, importance="magnitude", reconstruct=False))
    assert 0.3 <= stats["params_removed"] < 0.36


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"heads": 1.0}, "fraction in"),
        ({"ffn": -0.1}, "fraction in"),
        ({}, "nothing to prune"),
        ({"flops": 0.5, "heads": 0.5}, "one global target"),
    ],
)
def test_bad_budgets_are_refused(config: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        PruneConfig(**config).check()


def test_cli_fisher_with_reconstruction(
    tiny_bert: Path, tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pruned"
    args = [
        "--quiet",
        "--json",
        "prune",
        str(tiny_bert_onnx),
        "--calibration",
        str(tiny_csv),
        "--flops",
        "0.5",
        "--source",
        str(tiny_bert),
        "--samples",
        "48",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["importance"] == "fisher" and payload["flops_removed"] >= 0.5
    assert payload["size_bytes"]["after"] < payload["size_bytes"]["before"]
    assert payload["reconstruction"] and all(
        r["relative_error_after"] <= r["relative_error_before"] for r in payload["reconstruction"]
    )
    # The report on disk is this run's (what the command printed); the map is a PNG image.
    on_disk = json.loads((out / "pruning_report.json").read_text())
    assert (on_disk["flops_removed"], on_disk["params_removed"]) == (
        payload["flops_removed"],
        payload["params_removed"],
    )
    assert (out / "pruning_map.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    record = load_pruning_record(out)
    assert record["format"] == "trimformer-pruning-record/1" and record["num_layers"] == 2
    artifact = ModelArtifact.open(out)
    assert artifact.meta.lineage[-1].step == "prune"
    assert artifact.meta.extras["pruning"]["num_heads"] == [len(e["kept_heads"]) for e in record["layers"]]
    # The pruned artifact goes on through validate like any other.
    from trimformer.validation.validate import ValidateConfig, validate

    report = validate(
        ValidateConfig(
            model=str(out),
            data=str(tiny_csv),
            reference=str(tiny_bert_onnx),
            grid=((1, 16),),
            runs=3,
            warmup=1,
            min_seconds=0.0,
            limit=30,
            out=str(tmp_path / "r"),
        )
    )
    assert "accuracy" in json.dumps(report)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--flops", "1.2"], "fraction in"),
        (
            ["--flops", "0.999", "--importance", "magnitude", "--no-reconstruct"],
            "remove every head and every neuron",
        ),
        (["--flops", "0.5", "--importance", "ablation", "--no-reconstruct"], "needs calibration data"),
        (["--flops", "0.5", "--calibration", "DATA", "--source", "OTHER"], "do not match"),
    ],
)
def test_cli_bad_input(
    tiny_bert_onnx: Path,
    tiny_csv: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    extra: list[str],
    message: str,
) -> None:
    other = tmp_path_factory.getbasetemp() / "other_bert"
    if not other.exists():
        make_hf_model(other, seed=3)
    extra = [str(tiny_csv) if a == "DATA" else str(other) if a == "OTHER" else a for a in extra]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--quiet", "prune", str(tiny_bert_onnx), "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_record_validation(tmp_path: Path, tiny_bert: Path) -> None:
    bad = tmp_path / "pruning_record.json"
    bad.write_text(json.dumps({"format": "nope"}))
    with pytest.raises(UserError, match="not a trimformer-pruning-record"):
        load_pruning_record(bad)
    record = {
        "format": "trimformer-pruning-record/1",
        "architecture": "bert",
        "num_layers": 3,
        "num_heads": 4,
        "head_dim": 8,
        "hidden_size": 32,
        "ffn_size": 64,
        "importance": "x",
        "source_model_hash": "",
        "layers": [
            {
                "layer": i,
                "kept_heads": [0, 1, 2, 3],
                "removed_heads": [],
                "kept_neurons": list(range(64)),
                "removed_neurons": [],
            }
            for i in range(3)
        ],
    }
    source = load_source(tiny_bert)
    with pytest.raises(UserError, match="3 layers"):
        apply_pruning_record(source.model, record)


@pytest.mark.parametrize(("kind", "mode"), [("activation", "rows"), ("ablation", "scales")])
def test_onnx_only_importance_with_reconstruction(
    tiny_bert_onnx: Path, tiny_csv: Path, kind: str, mode: str
) -> None:
    from trimformer.data import Encoder, load_dataset
    from trimformer.data.calibration import DatasetFeeds
    from trimformer.data.tokenizer import load_tokenizer

    names = ["input_ids", "attention_mask", "token_type_ids"]
    encoder = Encoder(load_tokenizer(tiny_bert_onnx), names, 64)
    dataset = load_dataset(str(tiny_csv), limit=32)
    ctx = PassContext(calibration=lambda: DatasetFeeds(dataset, encoder, names, 32, 8, pad_to=None))
    proto, stats = _prune_proto(
        tiny_bert_onnx / "model.onnx", PruneConfig(flops=0.4, importance=kind, reconstruct_mode=mode), ctx
    )
    assert stats["importance"] == kind and stats["flops_removed"] >= 0.4
    scores = stats["scores"]["heads"]
    assert len(scores) == 2 and all(len(h) == 4 for h in scores) and max(map(max, scores)) > 0
    steps = stats["reconstruction"]
    assert steps and all(s["relative_error_after"] <= s["relative_error_before"] for s in steps)
    assert any(s["relative_error_after"] < s["relative_error_before"] for s in steps)
    _session(proto)  # loads and runs in onnxruntime


def test_exactness_check_catches_a_wrong_graph(tiny_bert_onnx: Path) -> None:
    from trimformer.errors import ParityError
    from trimformer.passes.prune.structured import verify_exact
    from trimformer.passes.prune.surgery import LayerPlan, apply_plan

    original = onnx.load(str(tiny_bert_onnx / "model.onnx"))
    model = ir.from_proto(original)
    layout = find_blocks(model.graph)
    applied = [LayerPlan((0, 1), tuple(range(64))), LayerPlan((0, 1, 2, 3), tuple(range(32)))]
    apply_plan(model, layout, applied)
    claimed = [LayerPlan((2, 3), tuple(range(64))), LayerPlan((0, 1, 2, 3), tuple(range(32, 64)))]
    reference_layout = find_blocks(ir.from_proto(original).graph)
    with pytest.raises(ParityError):
        verify_exact(original, ir.to_proto(model), reference_layout, claimed, PassContext())
    assert verify_exact(original, ir.to_proto(model), reference_layout, applied, PassContext()) < 1e-5


def test_pruned_artifact_goes_through_fuse(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    from trimformer.passes.base import apply_pass
    from trimformer.passes.fuse import fusion as fuse

    pruned = tmp_path / "pruned"
    args = [
        "--quiet",
        "prune",
        str(tiny_bert_onnx),
        "--heads",
        "0.5",
        "--ffn",
        "0.5",
        "--importance",
        "magnitude",
        "--no-reconstruct",
        "--out",
        str(pruned),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    record = load_pruning_record(pruned)
    # The original sizes: onnxruntime's fusion then reads each layer's head count from the graph.
    config = fuse.FuseConfig(num_heads=record["num_heads"], hidden_size=record["hidden_size"])
    fused, _ = apply_pass(ModelArtifact.open(pruned), "fuse", config, PassContext(), tmp_path / "fused")
    proto = fused.load_model()
    heads = sorted(
        next(a.i for a in n.attribute if a.name == "num_heads")
        for n in proto.graph.node
        if n.op_type == "Attention"
    )
    assert heads == sorted(len(e["kept_heads"]) for e in record["layers"] if e["kept_heads"])
    feeds = random_feeds(["input_ids", "attention_mask", "token_type_ids"], 2, 9, 60, seed=0)
    a = _session(ModelArtifact.open(pruned).load_model()).run(None, feeds)[0]
    b = _session(proto).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_prune_pass_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, trimformer.passes.prune.structured; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_per_head_attention_bias_is_sliced(tiny_bert_onnx: Path) -> None:
    """A constant bias and a computed bias with a head axis on the scores keep only kept heads."""
    proto = onnx.load(str(tiny_bert_onnx / "model.onnx"))
    graph = proto.graph
    rng = np.random.default_rng(0)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    nodes = [
        onnx.helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("ReduceMax", ["mask_f"], ["mask_max"], keepdims=0),
    ]
    for node in list(graph.node):
        if node in softmaxes:
            i = softmaxes.index(node)
            bias = onnx.numpy_helper.from_array(
                rng.normal(size=(1, 4, 1, 1)).astype(np.float32), f"head_bias_{i}"
            )
            graph.initializer.append(bias)
            source = bias.name
            if i == 1:  # computed: bias * max(mask)
                nodes.append(onnx.helper.make_node("Mul", [bias.name, "mask_max"], [f"head_bias_dyn_{i}"]))
                source = f"head_bias_dyn_{i}"
            nodes.append(onnx.helper.make_node("Add", [node.input[0], source], [f"biased_scores_{i}"]))
            node.input[0] = f"biased_scores_{i}"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    # The pass's own exactness check compares against the masked unpruned graph.
    report = PrunePass(PruneConfig(heads=0.5, importance="magnitude", reconstruct=False), PassContext())(
        model
    )
    assert report.stats["exactness_max_abs_diff"] < 1e-5
    pruned = ir.to_proto(report.model)
    assert any(n.op_type == "Gather" and "head_gather" in n.name for n in pruned.graph.node)
    _session(pruned)


def test_exactness_check_runs_in_ensures_after_reconstruction(tiny_bert_onnx: Path, tiny_csv: Path) -> None:
    from trimformer.data import Encoder, load_dataset
    from trimformer.data.calibration import DatasetFeeds
    from trimformer.data.tokenizer import load_tokenizer
    from trimformer.errors import ParityError

    names = ["input_ids", "attention_mask", "token_type_ids"]
    encoder = Encoder(load_tokenizer(tiny_bert_onnx), names, 64)
    dataset = load_dataset(str(tiny_csv), limit=16)
    ctx = PassContext(calibration=lambda: DatasetFeeds(dataset, encoder, names, 16, 8, pad_to=None))
    the_pass = PrunePass(PruneConfig(heads=0.5, ffn=0.5, importance="activation"), ctx)
    report = the_pass(ir.from_proto(onnx.load(str(tiny_bert_onnx / "model.onnx"))))
    # Surgery is checked exact against the masked model; reconstruction then refits values only.
    assert any(s["relative_error_after"] < s["relative_error_before"] for s in report.stats["reconstruction"])
    assert report.stats["exactness_max_abs_diff"] < 1e-4
    # A graph whose structure differs from what surgery produced fails the pass's ensures().
    gemm = [n for n in report.model.graph if n.op_type == "Gemm"][-1]
    bias = gemm.inputs[2]
    assert bias is not None and bias.const_value is not None
    wider = np.concatenate([bias.const_value.numpy(), np.zeros(1, np.float32)])
    value = ir.Value(name="tampered_bias", const_value=ir.tensor(wider, name="tampered_bias"))
    report.model.graph.register_initializer(value)
    gemm.replace_input_with(2, value)
    with pytest.raises(ParityError, match="changed the pruned graph's structure"):
        the_pass.ensures(report.model)
