"""The x86-avx2 int8 graph cannot saturate, proven in numpy on its real weights.

Without VNNI, onnxruntime's u8 x s8 kernel (vpmaddubsw) multiplies an unsigned activation byte by a
signed weight byte and sums adjacent pairs along the reduction axis into a saturating int16. This
emulates that step exactly where it can go wrong: with the largest activation code (255) against every
pair of weights sharing a sign, a pair sum is at most 255 x (|w_k| + |w_k+1|). The x86-avx2 target's
7-bit weights keep that under 32,767 for every pair of every matrix; the full 8-bit weights of x86-vnni
do not (the reason that target is refused for validation on CPUs without VNNI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from trimformer.artifact import ModelArtifact
from trimformer.passes.quantize.int8 import QuantizeConfig
from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_quantize

INT16_MAX = 32767


def worst_pair_sum(weight: np.ndarray) -> int:
    """The largest |pair sum| vpmaddubsw can form with u8 activations on a [K, N] int8 weight:
    adjacent rows along K, both products of one sign, activations 255."""
    w = weight.astype(np.int32)
    if w.shape[0] % 2:
        w = np.vstack([w, np.zeros((1, w.shape[1]), np.int32)])
    first, second = w[0::2], w[1::2]
    positive = np.maximum(first, 0) + np.maximum(second, 0)
    negative = np.minimum(first, 0) + np.minimum(second, 0)
    return int(255 * max(positive.max(), -negative.min()))


def _int8_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {init.name: init for init in model.graph.initializer}
    weights = []
    for node in model.graph.node:
        if node.op_type in ("MatMulIntegerToFloat", "MatMulInteger", "QAttention") and node.input[1] in inits:
            array = numpy_helper.to_array(inits[node.input[1]])
            if array.dtype == np.int8:
                weights.append(array.reshape(array.shape[0], -1))
    return weights


def test_the_emulation_is_the_saturating_pair_sum() -> None:
    assert worst_pair_sum(np.array([[63], [63]], np.int8)) == 255 * 126 <= INT16_MAX
    assert worst_pair_sum(np.array([[127], [127]], np.int8)) == 255 * 254 > INT16_MAX
    assert worst_pair_sum(np.array([[127], [-127]], np.int8)) == 255 * 127  # opposite signs cancel


@pytest.mark.parametrize(("target", "saturates"), [("x86-avx2", False), ("x86-vnni", True)])
def test_x86_avx2_weights_cannot_saturate_int16_pair_sums(
    target: str, saturates: bool, tiny_bert_onnx: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    run_quantize(
        QuantizeStageConfig(
            model=str(tiny_bert_onnx),
            out=str(tmp_path / target),
            calibration=str(tiny_csv),
            quantize=QuantizeConfig(samples=16),
            target=target,
        )
    )
    weights = _int8_weights(ModelArtifact.open(tmp_path / target).load_model())
    assert len(weights) >= 6  # every projection of both layers is an integer op
    worst = max(worst_pair_sum(w) for w in weights)
    assert (worst > INT16_MAX) is saturates, f"{target}: worst pair sum {worst}"
