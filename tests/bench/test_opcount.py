"""The benchmark's operation counter against the arithmetic of a known BERT."""

from __future__ import annotations

from pathlib import Path

from bench.opcount import count_ops


def test_count_ops_matches_the_analytic_count(tiny_bert_onnx: Path) -> None:
    layers, hidden, ffn, seq = 2, 32, 64, 128
    projections = 4 * 2 * seq * hidden * hidden  # Q, K, V, output
    feed_forward = 2 * 2 * seq * hidden * ffn
    attention = 2 * 2 * seq * seq * hidden  # scores and context over all heads
    pooler_and_classifier = 2 * hidden * hidden + 2 * hidden * 3
    expected = layers * (projections + feed_forward + attention) + pooler_and_classifier
    assert count_ops(tiny_bert_onnx / "model.onnx", batch=1, seq=seq) == expected
    assert count_ops(tiny_bert_onnx / "model.onnx", batch=2, seq=seq) > 1.99 * expected
