"""Decoder fusion on the Llama (GQA), Qwen2 and GPT-2 layouts: the graph really becomes
onnxruntime's fused kernels, and it decodes exactly as the exported graph, batches with left
padding included."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from tests.builders import make_causal_lm
from trimformer.artifact import ModelArtifact
from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.exporters import export_model
from trimformer.formats.decoder import DecoderSpec
from trimformer.passes.base import PassContext
from trimformer.passes.fuse.decoder import DecoderFuseConfig, DecoderFusePass
from trimformer.runtime.decoding import CachedSession, left_pad
from trimformer.runtime.session import cpu_session

PROMPTS = [[1, 17, 43, 9, 88], [1, 5], [1, 200, 31, 7, 7, 64, 12, 3, 99]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuse-decoder")
    out = {}
    # "-h16": heads of 16 floats, which onnxruntime's attention kernel rotates and packs itself.
    for name in ("llama", "qwen2", "gpt2", "llama-h16", "qwen2-h16"):
        family, _, wide = name.partition("-")
        make_causal_lm(root / name, family=family, context=128, head_dim=16 if wide else None)
        export_model(root / name, root / f"{name}-onnx", parity_tokens=2)
        out[name] = root / f"{name}-onnx"
    return out


def _fuse(folder: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, dict, DecoderSpec]:
    artifact = ModelArtifact.open(folder)
    spec = DecoderSpec.from_extras(artifact.meta.extras)
    plain = artifact.load_model()
    report = DecoderFusePass(
        DecoderFuseConfig(new_tokens=6), PassContext(decoder_spec=spec, prompts=PROMPTS)
    )(ir.from_proto(plain))
    return plain, ir.to_proto(report.model), report.stats, spec


@pytest.mark.parametrize(
    ("family", "norms", "skip"),
    [
        ("llama", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
        ("qwen2", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
        ("gpt2", "LayerNormalization", "SkipLayerNormalization"),
    ],
)
def test_fused_kernels_and_exact_greedy_tokens(
    exports: dict[str, Path], family: str, norms: str, skip: str
) -> None:
    plain, fused, stats, spec = _fuse(exports[family])
    ops = Counter(n.op_type for n in fused.graph.node)
    # One GroupQueryAttention per layer, with the model's query and KV head counts; no Softmax left.
    assert (
        ops["GroupQueryAttention"] == 2
        and ops["Softmax"] == 0
        and stats["fusions"]["group_query_attention"] == 2
    )
    gqa = next(n for n in fused.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["num_heads"] == spec.num_heads and attrs["kv_num_heads"] == spec.num_kv_heads
    # Every residual Add of the rotary families is in a skip norm (both of each layer's, the attention
    # output's once attention is one node); only the first norm, on the embeddings, has no skip.
    if family != "gpt2":
        assert ops[skip] == 4 and ops[norms] == 1
        assert ops["Add"] == (6 if family == "qwen2" else 0)  # qwen2: its q, k, v biases
    else:  # GPT-2: the position embedding Add too; the final norm reads the last residual sum
        assert ops[skip] == 3 and ops[norms] == 2
    # Rotary families: each layer's query and key rotation is one RotaryEmbedding with cos/sin tables.
    assert ops["RotaryEmbedding"] == (0 if family == "gpt2" else 4)
    assert stats["fusions"]["packed_qkv"] == stats["fusions"]["rotary_in_attention"] == 0
    # The cache contract is unchanged: same inputs and outputs, names, order.
    assert [o.name for o in fused.graph.output] == [o.name for o in plain.graph.output]
    assert stats["parity"]["token_agreement"] == 1.0 and stats["parity"]["tokens"] == len(PROMPTS) * 6


@pytest.mark.parametrize("family", ["llama-h16", "qwen2-h16"])
def test_wide_heads_are_rotated_and_packed_by_the_attention_kernel(
    exports: dict[str, Path], family: str
) -> None:
    _, fused, stats, spec = _fuse(exports[family])
    ops = Counter(n.op_type for n in fused.graph.node)
    # No RotaryEmbedding node: GroupQueryAttention rotates queries and keys (do_rotary, the graph's
    # cos/sin tables), and q, k, v are one MatMul per layer (qwen2: one bias Add).
    assert ops["RotaryEmbedding"] == 0 and stats["fusions"]["rotary_in_attention"] == 2
    assert stats["fusions"]["packed_qkv"] == 2 and ops["MatMul"] == 2 * (1 + 1 + 3) + 1
    assert ops["Add"] == (2 if family.startswith("qwen2") else 0)
    producers = {out: n for n in fused.graph.node for out in n.output}
    weights = {i.name: list(i.dims) for i in fused.graph.initializer}
    for gqa in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        # packed q, k, v; rotation by cache slot (see fuse_group_query_attention), not position_ids
        assert gqa.input[1] == gqa.input[2] == "" and gqa.input[7] and gqa.input[9] == ""
        packed = producers[gqa.input[0]]
        if packed.op_type == "Add":  # qwen2's q/k/v biases, packed the same way
            packed = producers[next(name for name in packed.input if name in producers)]
        # hidden 32 in, every query head and both KV heads' keys and values out
        assert weights[packed.input[1]] == [32, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim]
    assert stats["parity"]["token_agreement"] == 1.0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "llama-h16", "qwen2-h16"])
def test_left_padded_batches_decode_as_before(exports: dict[str, Path], family: str) -> None:
    plain, fused, _, spec = _fuse(exports[family])
    ids, mask = left_pad(PROMPTS, spec.pad_token_id or 0)
    sessions = [CachedSession(cpu_session(graph), spec) for graph in (plain, fused)]
    outputs = []
    for session in sessions:
        logits, state = session.prompt(ids, mask)
        steps = [logits[:, -1]]
        for _ in range(4):
            token = np.argmax(steps[-1], axis=-1)[:, None]
            logits, state = session.step(token, state)
            steps.append(logits[:, -1])
        outputs.append(np.stack(steps))
    # Every row's next-token logits (padding in the attention bias, not in seqlens_k) agree.
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-4)


def test_cli_fuses_a_decoder_and_quantizes_the_fused_graph(exports: dict[str, Path], tmp_path: Path) -> None:
    fused = tmp_path / "fused"
    result = CliRunner().invoke(cli, ["fuse", str(exports["llama"]), "--out", str(fused)])
    assert result.exit_code == 0, result.output
    assert "group_query_attention x2" in result.output and "greedy tokens equal" in result.output
    assert ModelArtifact.open(fused).meta.lineage[-1].step == "fuse-decoder"
    out = tmp_path / "int8"
    args = [
        "quantize",
        str(fused),
        "--weight-only",
        "int8",
        "--block-size",
        "16",
        "--min-token-agreement",
        "0",
    ]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    ops = Counter(n.op_type for n in ModelArtifact.open(out).load_model().graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] == 15


def test_head_options_are_refused_for_a_decoder(exports: dict[str, Path], tmp_path: Path) -> None:
    from trimformer.passes.fuse.fusion import FuseConfig
    from trimformer.pipeline.stages.quantize import run_fuse

    with pytest.raises(UserError, match="leave out --num-heads"):
        run_fuse(str(exports["llama"]), str(tmp_path / "x"), FuseConfig(num_heads=4))
    assert not (tmp_path / "x").exists()


def test_outputs_keep_their_types_and_dynamic_axes(exports: dict[str, Path]) -> None:
    plain, fused, _, _ = _fuse(exports["llama"])
    assert [o.type for o in fused.graph.output] == [o.type for o in plain.graph.output]
