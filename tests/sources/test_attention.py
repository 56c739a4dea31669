"""The one packed-Q/K/V attention: what torch's own attention computes, the same for the plain
model's forward, its pruned form and distillation's features, and, with every head of a layer
pruned, exactly what the ONNX prune pass leaves (the output bias)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from tests.builders import make_plain_model
from trimformer.exporters import export_model
from trimformer.passes.graph import find_blocks
from trimformer.passes.prune.structured import build_record
from trimformer.passes.prune.surgery import LayerPlan, apply_plan
from trimformer.runtime.session import cpu_session
from trimformer.sources import PlainTransformerClassifier, load_source
from trimformer.sources.attention import packed_qkv_attention
from trimformer.sources.pruning import apply_pruning_record, mask_model
from trimformer.training.distill.features import model_features, run_spec_for

HEADS, HEAD_DIM, FFN = 4, 8, 64


def _plain(folder: Path) -> PlainTransformerClassifier:
    model = load_source(make_plain_model(folder, layers=2, heads=HEADS, ffn=FFN)).model
    assert isinstance(model, PlainTransformerClassifier)
    torch.manual_seed(5)
    with torch.no_grad():  # larger weights than the random init, so that every head matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _feeds(batch: int = 3, seq: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 3 :] = 0  # padding on one row
    return {"input_ids": torch.randint(4, 40, (batch, seq), generator=generator), "attention_mask": mask}


def _record(kept_heads: list[list[int]]) -> dict[str, Any]:
    return {
        "format": "trimformer-pruning-record/1",
        "architecture": "plain",
        "num_layers": len(kept_heads),
        "num_heads": HEADS,
        "head_dim": HEAD_DIM,
        "hidden_size": HEADS * HEAD_DIM,
        "ffn_size": FFN,
        "importance": "test",
        "layers": [
            {
                "layer": i,
                "kept_heads": kept,
                "removed_heads": [h for h in range(HEADS) if h not in kept],
                "kept_neurons": list(range(FFN)),
                "removed_neurons": [],
            }
            for i, kept in enumerate(kept_heads)
        ],
    }


def test_matches_torch_multihead_attention(tmp_path: Path) -> None:
    model = _plain(tmp_path / "m")
    feeds = _feeds()
    hidden, additive = model.embed_inputs(feeds["input_ids"], feeds["attention_mask"])
    attn = model.encoder.layers[0].self_attn
    with torch.no_grad():
        ours = packed_qkv_attention(attn, hidden, additive, HEAD_DIM, training=False)
        # A float key_padding_mask is added to the scores, as our additive mask is.
        theirs, probs = attn(hidden, hidden, hidden, key_padding_mask=additive, average_attn_weights=False)
    torch.testing.assert_close(ours.output, theirs, atol=1e-5, rtol=0)
    assert ours.probs is not None
    torch.testing.assert_close(ours.probs, probs, atol=1e-6, rtol=0)


def test_forward_features_and_pruned_model_agree(tmp_path: Path) -> None:
    model = _plain(tmp_path / "m")
    feeds = _feeds()
    record = _record([[], [1, 3]])  # layer 0 loses every head, layer 1 half of them
    pruned = copy.deepcopy(model)
    apply_pruning_record(pruned, record)
    with torch.no_grad():
        features = model_features(
            pruned, run_spec_for(load_source(tmp_path / "m")), feeds, intermediates=True
        )
        logits = pruned(feeds["input_ids"], feeds["attention_mask"])
        with mask_model(model, record):
            masked = model(feeds["input_ids"], feeds["attention_mask"])
        hidden, additive = pruned.embed_inputs(feeds["input_ids"], feeds["attention_mask"])
        headless = packed_qkv_attention(pruned.encoder.layers[0].self_attn, hidden, additive, HEAD_DIM, False)
    # Distillation's features are the model's own forward, bit for bit.
    assert torch.equal(features.output, logits)
    # Removing heads computes what masking them does.
    torch.testing.assert_close(logits, masked, atol=1e-5, rtol=0)
    # A layer without heads reports no attention and adds only the output projection's bias.
    assert features.attentions[0] is None and features.attentions[1] is not None
    assert features.attentions[1].shape[1] == 2
    bias = pruned.encoder.layers[0].self_attn.out_proj.bias
    assert torch.equal(headless.output, bias.expand_as(hidden)) and headless.probs is None


def test_headless_attention_without_bias_adds_nothing() -> None:
    attn = nn.MultiheadAttention(16, 2, bias=False, batch_first=True)
    attn.in_proj_weight = nn.Parameter(torch.zeros(0, 16))
    attn.out_proj.weight = nn.Parameter(torch.zeros(16, 0))
    hidden = torch.randn(2, 5, 16)
    out = packed_qkv_attention(attn, hidden, torch.zeros(2, 5), head_dim=8, training=True)
    assert torch.equal(out.output, torch.zeros(2, 5, 16)) and out.probs is None


def test_headless_layer_matches_the_onnx_prune_pass(tmp_path: Path) -> None:
    model = _plain(tmp_path / "m")
    model.save(tmp_path / "m")
    export_model(tmp_path / "m", tmp_path / "onnx")
    graph = ir.from_proto(onnx.load(str(tmp_path / "onnx" / "model.onnx")))
    layout = find_blocks(graph.graph)
    plan = [LayerPlan((), tuple(range(FFN))), LayerPlan((0, 2), tuple(range(FFN)))]
    apply_plan(graph, layout, plan)
    pruned = copy.deepcopy(model)
    apply_pruning_record(pruned, build_record(layout, plan, "plain", "test", ""))
    feeds = _feeds()
    session = cpu_session(ir.to_proto(graph))
    got = session.run(None, {name: array.numpy() for name, array in feeds.items()})[0]
    with torch.no_grad():
        expected = pruned(feeds["input_ids"], feeds["attention_mask"]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
