"""ONNX-only importance: a unit scores by its mean share, per position, of the residual sum its
block's LayerNorm normalises; in a [CLS] classifier the last layer counts only at the first position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from tests.builders import make_hf_model
from trimformer.data import Encoder, load_dataset
from trimformer.data.calibration import DatasetFeeds
from trimformer.data.tokenizer import load_tokenizer
from trimformer.exporters import export_model
from trimformer.passes.graph import EncoderLayout, find_blocks
from trimformer.passes.intermediates import iter_outputs, session_with_outputs
from trimformer.passes.prune.importance import activation_scores, reads_first_token_only

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def _layout(model: onnx.ModelProto) -> EncoderLayout:
    return find_blocks(ir.from_proto(model).graph)


def _calibration(folder: Path, data: Path) -> object:
    encoder = Encoder(load_tokenizer(folder), NAMES, 32)
    dataset = load_dataset(str(data), limit=16)
    return lambda: DatasetFeeds(dataset, encoder, NAMES, 16, 8, pad_to=None)


def test_a_cls_classifier_reads_the_first_position_only(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_bert_onnx / "model.onnx"))
    assert reads_first_token_only(_layout(model))
    # An encoder whose every position is an output (feature extraction) does not.
    make_hf_model(tmp_path / "src", task="feature-extraction")
    export_model(tmp_path / "src", tmp_path / "onnx")
    features = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert not reads_first_token_only(_layout(features))


@pytest.mark.parametrize("layer", [0, 1])
def test_head_scores_are_shares_of_the_residual_sum(tiny_bert_onnx: Path, tiny_csv: Path, layer: int) -> None:
    model = onnx.load(str(tiny_bert_onnx / "model.onnx"))
    layout = _layout(model)
    calibration = _calibration(tiny_bert_onnx, tiny_csv)
    scores = activation_scores(model, layout, calibration)

    attn = layout.layers[layer].attention
    h, d = attn.num_heads, attn.head_dim
    context, total = str(attn.context.name), str(attn.residual.node.outputs[0].name)
    out = attn.out.weight.astype(np.float64).reshape(h, d, -1)
    expected, positions = np.zeros(h), 0
    session = session_with_outputs(model, [context, total])
    for feeds, values in iter_outputs(session, [context, total], calibration):
        keep = feeds["attention_mask"].astype(bool)
        if layer == len(layout.layers) - 1:
            keep[:, 1:] = False  # the classifier reads [CLS] only
        x = values[context][keep].astype(np.float64).reshape(-1, h, d)
        norm = np.linalg.norm(values[total][keep].astype(np.float64), axis=-1) + 1e-6
        contrib = np.einsum("nhd,hdo->nho", x, out) / norm[:, None, None]
        expected += (contrib**2).sum(axis=(0, 2))
        positions += int(keep.sum())
    # Per counted position, so the last layer (one position a row) compares with the others.
    np.testing.assert_allclose(scores.heads[layer], np.sqrt(expected / positions), rtol=1e-6)
