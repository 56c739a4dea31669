"""Weight-only int4/int8 of a causal LM: the weights really become MatMulNBits blocks that
dequantize to the float weights, the graph still decodes like its float self, and the settings
that onnxruntime cannot honour are refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from tests.builders import make_causal_lm, make_csv
from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.data.calibration import DecoderFeeds
from trimformer.data.datasets import load_dataset
from trimformer.errors import GateFailed, UserError
from trimformer.exporters import export_model
from trimformer.formats.decoder import DecoderSpec
from trimformer.passes.base import PassContext
from trimformer.passes.quantize import accuracy_level
from trimformer.passes.quantize.accuracy_level import set_accuracy_level
from trimformer.passes.quantize.weight_only import WeightOnlyConfig, WeightOnlyPass, find_lm_head
from trimformer.runtime.decoding import CachedSession
from trimformer.runtime.session import cpu_session

BLOCK = 16


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wo")
    out = {"csv": make_csv(root / "t.csv", rows=80)}
    for family in ("llama", "gpt2"):  # llama: its own lm_head; gpt2: tied to the token table
        folder = make_causal_lm(root / family, context=256, tied=family == "gpt2")
        export_model(folder, root / f"{family}-onnx", parity_tokens=2)
        out[family] = root / f"{family}-onnx"
    # Fused with 16-float heads: attention rotates by cache slot, and nothing reads position_ids.
    folder = make_causal_lm(root / "wide", context=256, head_dim=16)
    export_model(folder, root / "wide-onnx", parity_tokens=2)
    result = CliRunner().invoke(
        cli, ["--quiet", "fuse", str(root / "wide-onnx"), "--out", str(root / "wide-fused")]
    )
    assert result.exit_code == 0, result.output
    out["fused"] = root / "wide-fused"
    return out


def _run(artifact_dir: Path, csv: Path | None = None, **settings: object) -> tuple[onnx.ModelProto, dict]:
    artifact = ModelArtifact.open(artifact_dir)
    spec = DecoderSpec.from_extras(artifact.meta.extras)
    tokenizer = _tokenizer(artifact)
    prompts = [tokenizer.encode(t).ids[:8] for t in ("the car is good", "a plane flew over", "my phone is")]
    ctx = PassContext(decoder_spec=spec, prompts=prompts)
    if csv is not None:
        texts = load_dataset(str(csv), split="all").texts
        ctx.calibration = lambda: DecoderFeeds(texts, tokenizer, spec, blocks=8, block=32)
    config = WeightOnlyConfig(
        **{"block_size": BLOCK, "new_tokens": 8, "min_token_agreement": 0.0, **settings}
    )
    report = WeightOnlyPass(config, ctx)(ir.from_proto(artifact.load_model()))
    return ir.to_proto(report.model), report.stats


def _tokenizer(artifact: ModelArtifact):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(artifact.path / artifact.meta.tokenizer.file))


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _dequantize(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """A MatMulNBits' weight [K, N] read back from its blocks, and each weight's block scale."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed, scales = inits[node.input[1]], inits[node.input[2]].astype(np.float64)
    bits, k, n, block = (_attr(node, name) for name in ("bits", "K", "N", "block_size"))
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, -1) if bits == 4 else packed.reshape(n, -1)
    zero = 2 ** (bits - 1)  # symmetric: no zero-point input, the kernel's implicit middle
    assert len(node.input) < 4 or not node.input[3]
    values = (q.astype(np.float64) - zero) * np.repeat(scales, block, axis=1)
    return values[:, :k].T, np.abs(np.repeat(scales, block, axis=1)[:, :k].T)


def _float_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_rtn_int4_blocks_dequantize_to_the_float_weights(lms: dict[str, Path]) -> None:
    original = ModelArtifact.open(lms["llama"]).load_model()
    weights = _float_weights(original)
    model, stats = _run(lms["llama"])
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # 2 layers x 7 projections at 4 bits, and the lm_head at int8 (the default).
    assert stats["matmul_nbits"] == 15 == len(nodes) and stats["float_matmuls_with_weights"] == 0
    lm_head = next(n for n in nodes if "logits" in n.output)
    assert _attr(lm_head, "bits") == 8 and sorted({_attr(n, "bits") for n in nodes if n is not lm_head}) == [
        4
    ]
    for node in nodes:
        name = node.input[1].removesuffix("_Q4").removesuffix("_Q8")
        w = weights[name]
        got, scale = _dequantize(model, node)
        assert got.shape == w.shape and _attr(node, "block_size") == BLOCK
        # Round to nearest on a symmetric grid of [-8, 7] steps (the largest magnitude sits on -8):
        # within half a step, but for the few positive weights near +8 steps, clipped to +7.
        error = np.abs(got - w) / scale
        assert error.max() <= 1 + 1e-6 and np.mean(error <= 0.5 + 1e-6) > 0.95, node.name
        # What is stored: ``bits`` per weight (K padded to whole blocks) and the block scales.
        packed = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[1]))
        k, n, bits = w.shape[0], w.shape[1], _attr(node, "bits")
        assert packed.dtype == np.uint8 and packed.nbytes == n * -(-k // BLOCK) * BLOCK * bits // 8
    assert stats["size_mb"] < stats["input_size_mb"]


def test_quantized_graph_decodes_like_the_float_one(lms: dict[str, Path]) -> None:
    _, int8 = _run(lms["llama"], bits=8)
    _, int4 = _run(lms["llama"], lm_head="int4")
    # Teacher-forced on the float graph's greedy tokens: 8-bit blocks barely move the logits.
    assert int8["fidelity"]["tokens"] == 3 * 8 and int8["fidelity"]["token_agreement"] >= 0.95
    assert int8["fidelity"]["kl"] < int4["fidelity"]["kl"]


def test_tied_lm_head_gets_its_own_copy_and_the_table_goes_8_bit(lms: dict[str, Path]) -> None:
    original = ModelArtifact.open(lms["gpt2"]).load_model()
    head = find_lm_head(original.graph)
    assert head is not None and head.input[1] not in _float_weights(original)  # MatMul(x, Transpose(table))
    table_name = next(
        n.input[0] for n in original.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"
    )
    table = _float_weights(original)[table_name]
    model, stats = _run(lms["gpt2"], embedding="int8")
    assert stats["lm_head_untied"] and stats["embedding"] == "int8"
    ops = [n.op_type for n in model.graph.node]
    assert "Transpose" not in [n.op_type for n in model.graph.node if table_name in n.input]
    assert table_name not in _float_weights(model)  # no float copy of the table is left
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert ops.count("GatherBlockQuantized") == 1 and _attr(gather, "bits") == 8
    # The quantized table, run by onnxruntime's kernel, gives every row within one step.
    rows = _gather_rows(model, gather, np.arange(table.shape[0]))
    step = np.abs(table).max(axis=1, keepdims=True) * 2 / 255
    assert np.all(np.abs(rows - table) <= step + 1e-6)


@pytest.mark.parametrize(("bits", "block"), [("int4", BLOCK), ("int8", BLOCK), ("int4", 64)])
def test_tied_table_is_read_from_the_lm_head_blocks(lms: dict[str, Path], bits: str, block: int) -> None:
    separate, _ = _run(lms["gpt2"], lm_head=bits, embedding="float", block_size=block)
    model, stats = _run(lms["gpt2"], lm_head=bits, embedding=bits, block_size=block)
    assert stats["embedding_shares_lm_head"] and stats["embedding"] == bits
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output)
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    # One quantized copy of the table: beside a float table, sharing saves the whole float table
    # less a few nodes, and adds no quantized copy.
    table_bytes = max(w.nbytes for w in _float_weights(separate).values() if w.dtype == np.float32)
    assert table_bytes - 1000 < separate.ByteSize() - model.ByteSize() <= table_bytes
    # Every token's row is the lm_head's dequantized column for that token (K=32: block 64 pads).
    weight, _ = _dequantize(model, head)
    rows = _gather_rows(model, gather, np.arange(weight.shape[1]))
    np.testing.assert_allclose(rows, weight.T, rtol=1e-6, atol=1e-7)
    assert stats["fidelity"]["tokens"] == 3 * 8  # the whole graph decodes with the shared table


def _gather_rows(model: onnx.ModelProto, gather: onnx.NodeProto, ids: np.ndarray) -> np.ndarray:
    """The rows a token-table lookup gives, run alone by onnxruntime: the Gather and the nodes
    between it and the initializers (a tied table's Reshape, the Slice of a padded block)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    nodes, names = [gather], set(gather.input)
    while missing := [name for name in names if name in producers and producers[name] not in nodes]:
        nodes.insert(0, producers[missing[0]])
        names |= set(producers[missing[0]].input)
    after = next((n for n in model.graph.node if n.op_type == "Slice" and gather.output[0] in n.input), None)
    nodes += [after] if after is not None else []
    names |= {name for node in nodes for name in node.input}
    inits = [i for i in model.graph.initializer if i.name in names]
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    ids_name = gather.input[1]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(ids_name, onnx.TensorProto.INT64, [None])],
        [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
        initializer=inits,
    )
    small = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {ids_name: ids.astype(np.int64)})[0]


def test_gptq_is_calibrated_on_text_rows(lms: dict[str, Path]) -> None:
    model, stats = _run(lms["llama"], csv=lms["csv"], algo="gptq", samples=4)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 15 and stats["settings"]["algo"] == "gptq" and stats["settings"]["symmetric"]
    assert 0 <= stats["fidelity"]["token_agreement"] <= 1
    # GPTQ moves weights off the nearest grid point to cancel errors: the result differs from RTN.
    rtn, _ = _run(lms["llama"])
    gptq_blocks, rtn_blocks = _blocks_by_output(model), _blocks_by_output(rtn)
    assert gptq_blocks.keys() == rtn_blocks.keys()
    changed = [out for out, packed in gptq_blocks.items() if not np.array_equal(packed, rtn_blocks[out])]
    assert len(changed) >= 14  # every GPTQ'd projection; the lm_head is RTN int8 in both


def test_gptq_takes_a_fused_graph_whose_position_ids_nothing_reads(lms: dict[str, Path]) -> None:
    model, stats = _run(lms["fused"], csv=lms["csv"], algo="gptq", samples=4)
    # 2 layers x (packed qkv, o, gate, up, down) and the lm_head; position_ids stays an input, unread.
    assert stats["matmul_nbits"] == 11 and stats["float_matmuls_with_weights"] == 0
    assert "position_ids" in [i.name for i in model.graph.input]
    assert not any(n.op_type == "Identity" and "position_ids" in n.input for n in model.graph.node)
    assert stats["fidelity"]["tokens"] == 3 * 8


def _blocks_by_output(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    weights = _float_weights(model)
    return {n.output[0]: weights[n.input[1]] for n in model.graph.node if n.op_type == "MatMulNBits"}


def test_gptq_without_calibration_is_refused(lms: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="needs calibration data"):
        _run(lms["llama"], algo="gptq")


def test_gptq_on_text_shorter_than_a_block_is_refused(lms: dict[str, Path], tmp_path: Path) -> None:
    short = tmp_path / "short.csv"
    short.write_text("text,label\nhi,a\n")
    with pytest.raises(UserError, match="shorter than one block of tokens"):
        _run(lms["llama"], csv=short, algo="gptq")


def test_accuracy_level_is_written_on_every_node(lms: dict[str, Path]) -> None:
    model, stats = _run(lms["llama"], accuracy_level=4)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {_attr(n, "accuracy_level") for n in nodes} == {4} and stats["settings"]["accuracy_level"] == 4
    assert set_accuracy_level(model, 0) == len(nodes)
    assert not any(a.name == "accuracy_level" for n in nodes for a in n.attribute)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"algo": "gptq", "bits": 8}, "GPTQ writes MatMulNBits for 4 bits only"),
        ({"algo": "hqq", "symmetric": True}, "HQQ fits a zero point"),
        ({"block_size": 24}, "block_size must be a power of two from 16 to 256"),
        ({"block_size": 512}, "block_size must be a power of two"),
        ({"lm_head": "int2"}, "lm_head: must be one of int4, int8, float"),
        ({"bits": 3}, "bits: must be 4 or 8"),
    ],
)
def test_settings_onnxruntime_cannot_honour_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        WeightOnlyConfig(**settings)


def test_decoder_feeds_are_blocks_of_running_text(lms: dict[str, Path]) -> None:
    artifact = ModelArtifact.open(lms["llama"])
    spec = DecoderSpec.from_extras(artifact.meta.extras)
    feeds = DecoderFeeds(["a b c d e"] * 50, _tokenizer(artifact), spec, blocks=3, block=16)
    rows = [feeds.get_next() for _ in range(len(feeds))]
    assert len(rows) == 3 and feeds.get_next() is None
    assert set(rows[0]) == set(spec.input_names())
    assert rows[0]["input_ids"].shape == (1, 16) and rows[0]["past_key_values.0.key"].shape[2] == 0
    # Texts run on across block edges, each ended by eos, as in training.
    assert 2 in rows[0]["input_ids"] and rows[1]["position_ids"].tolist() == [list(range(16))]


def test_a_given_level_is_gated_too(lms: dict[str, Path]) -> None:
    with pytest.raises(GateFailed, match=r"token agreement with the float graph is .* at accuracy_level 1"):
        _run(lms["llama"], lm_head="int4", block_size=256, accuracy_level=1, min_token_agreement=0.999)


def test_auto_measures_each_distinct_kernel_once(lms: dict[str, Path]) -> None:
    _, stats = _run(lms["llama"], bits=8)
    levels = stats["accuracy_levels"]
    measured = [k for k, f in levels.items() if "same_as" not in f]
    assert "1" in measured and all(levels[k]["decode_tokens_per_s"] > 0 for k in measured)
    # With no floor, the fastest measured level is kept.
    fastest = max(measured, key=lambda k: levels[k]["decode_tokens_per_s"])
    assert stats["accuracy_level"] == int(fastest)


def test_a_graph_with_nothing_to_quantize_is_refused(lms: dict[str, Path]) -> None:
    quantized, _ = _run(lms["llama"], lm_head="int8")
    with pytest.raises(UserError, match="no MatMul with a constant weight to quantize"):
        WeightOnlyPass(WeightOnlyConfig(), PassContext())(ir.from_proto(quantized))


def test_a_level_that_fails_parity_is_not_chosen(
    lms: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Level 4's session is forced to a graph that flips tokens (the lm_head's scales negated), so
    its measured agreement fails the floor however fast it is: the pass keeps level 1."""
    real = accuracy_level._distinct_kernels

    def with_broken_level_4(quantized: onnx.ModelProto, spec: DecoderSpec, probe: list[int]):
        sessions, same_as = real(quantized, spec, probe)
        broken = onnx.ModelProto.FromString(quantized.SerializeToString())
        head = next(n for n in broken.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output)
        scales = next(i for i in broken.graph.initializer if i.name == head.input[2])
        scales.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scales), scales.name))
        set_accuracy_level(broken, 4)
        sessions[4] = CachedSession(cpu_session(broken), spec)
        return sessions, same_as

    monkeypatch.setattr(accuracy_level, "_distinct_kernels", with_broken_level_4)
    model, stats = _run(lms["llama"], bits=8, min_token_agreement=0.9)
    levels = stats["accuracy_levels"]
    assert levels["4"]["token_agreement"] < 0.9 <= levels["1"]["token_agreement"]
    assert stats["accuracy_level"] == 1
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {_attr(n, "accuracy_level") for n in nodes} == {1}
