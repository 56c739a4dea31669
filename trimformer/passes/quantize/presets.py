"""Quantization presets per target, and the calibration methods.

Each preset fixes the onnxruntime quantizer's knobs for one kind of hardware; the reasoning and
the measurements behind each choice are in docs/QUANTIZATION.md. Formats:

- ``qoperator``: onnxruntime's integer operators with constant (calibrated) activation scales:
  QAttention, MatMulIntegerToFloat, QEmbedLayerNormalization. The same kernels as dynamic int8,
  without the per-call range computation; CPU only.
- ``qdq``: QuantizeLinear/DequantizeLinear pairs, which every execution provider understands
  (TensorRT, QNN, XNNPACK); on CPU onnxruntime turns DQ -> MatMul into MatMulIntegerToFloat, but
  leaves the fused Attention op in float (onnxruntime#8770).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trimformer.errors import UserError

__all__ = ["FORMATS", "METHODS", "PRESETS", "QuantPreset", "check_choice", "get_preset"]

Format = Literal["qoperator", "qdq"]
FORMATS: tuple[str, ...] = ("qoperator", "qdq")
METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantPreset:
    name: str
    format: Format
    activation_type: Literal["uint8", "int8"]
    weight_type: Literal["int8", "uint8"]
    per_channel: bool
    reduce_range: bool
    symmetric_activations: bool
    # Quantize the fused Attention's QKV projection (QAttention; qoperator format only).
    attention: bool
    # Store the embedding tables in 8 bits (QEmbedLayerNormalization; qoperator format only).
    embeddings: bool
    # SmoothQuant migration strength (0: off).
    smooth_alpha: float
    description: str
    # Rewrite to onnxruntime's faster CPU kernels (cpu_kernels.py: Sum + LayerNormalization
    # instead of SkipLayerNormalization, biases inside the int8 matmuls).
    cpu_kernels: bool = True


PRESETS: dict[str, QuantPreset] = {
    "cpu-vnni": QuantPreset(
        name="cpu-vnni",
        format="qoperator",
        activation_type="uint8",
        weight_type="int8",
        per_channel=True,
        reduce_range=False,
        symmetric_activations=False,
        attention=True,
        embeddings=True,
        smooth_alpha=0.75,
        description="x86 with AVX512-VNNI/AVX-VNNI: u8 activations x s8 weights, per-channel, full 8-bit range",
    ),
    "cpu-avx2": QuantPreset(
        name="cpu-avx2",
        format="qoperator",
        activation_type="uint8",
        weight_type="int8",
        per_channel=True,
        # Without VNNI, u8 x s8 products are summed in pairs into int16 (vpmaddubsw) and can saturate;
        # 7-bit weights avoid that.
        reduce_range=True,
        symmetric_activations=False,
        attention=True,
        embeddings=True,
        smooth_alpha=0.75,
        description="x86 with AVX2 and no VNNI: like cpu-vnni with 7-bit weights (reduce_range)",
    ),
    "arm64": QuantPreset(
        name="arm64",
        format="qoperator",
        activation_type="uint8",
        weight_type="int8",
        per_channel=True,
        reduce_range=False,
        symmetric_activations=False,
        attention=True,
        embeddings=True,
        smooth_alpha=0.75,
        description="ARM64 (NEON dot product / i8mm): u8 x s8 integer operators, per-channel",
    ),
    "tensorrt": QuantPreset(
        name="tensorrt",
        format="qdq",
        activation_type="int8",
        weight_type="int8",
        per_channel=True,
        reduce_range=False,
        # TensorRT only accepts symmetric int8 (zero point 0) in explicit-quantization QDQ graphs.
        symmetric_activations=True,
        attention=False,
        embeddings=False,
        smooth_alpha=0.75,
        description="TensorRT / GPU: symmetric S8S8 QDQ, per-channel weights",
        cpu_kernels=False,
    ),
}


def check_choice(kind: str, value: str, known: tuple[str, ...] | list[str]) -> str:
    if value not in known:
        raise UserError(f"unknown {kind} {value!r}; known {kind}s: {', '.join(known)}")
    return value


def get_preset(name: str) -> QuantPreset:
    check_choice("preset", name, tuple(PRESETS))
    return PRESETS[name]
