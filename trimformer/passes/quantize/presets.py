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

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal, cast

from trimformer.errors import UserError
from trimformer.runtime.cpu import cpu_class

__all__ = [
    "AUTO_PRESET",
    "FORMATS",
    "METHODS",
    "PRESETS",
    "PRESET_NAMES",
    "QuantizerSettings",
    "check_choice",
    "get_preset",
    "host_preset",
]

logger = logging.getLogger(__name__)

Format = Literal["qoperator", "qdq"]
FORMATS: tuple[str, ...] = ("qoperator", "qdq")
METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizerSettings:
    """The onnxruntime quantizer's knobs. A preset is one of these; a run's effective settings
    are the preset with the user's overrides (:meth:`overridden`)."""

    preset: str
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
    # Rewrite to onnxruntime's faster CPU kernels (cpu_kernels.py: Sum + LayerNormalization
    # instead of SkipLayerNormalization, biases inside the int8 matmuls).
    cpu_kernels: bool = True
    # The activation ranges come from quantization-aware training, not calibration.
    ranges_from_training: bool = False
    # For people choosing a preset; not a quantizer setting, so not in the report.
    description: str = dataclasses.field(default="", compare=False)

    @property
    def integer_ops(self) -> bool:
        """Whether the quantizer writes onnxruntime's IntegerOps operators (else QDQ pairs)."""
        return self.format == "qoperator"

    def overridden(
        self,
        *,
        format: str | None = None,
        per_channel: bool | None = None,
        reduce_range: bool | None = None,
        smooth_alpha: float | None = None,
        cpu_kernels: bool | None = None,
    ) -> QuantizerSettings:
        """These settings with the given (not None) values instead; Attention and the embedding
        tables are quantized only in the format that has integer kernels for them."""
        fmt = cast(Format, check_choice("format", format, FORMATS) if format is not None else self.format)
        return dataclasses.replace(
            self,
            format=fmt,
            per_channel=self.per_channel if per_channel is None else per_channel,
            reduce_range=self.reduce_range if reduce_range is None else reduce_range,
            smooth_alpha=self.smooth_alpha if smooth_alpha is None else smooth_alpha,
            cpu_kernels=self.cpu_kernels if cpu_kernels is None else cpu_kernels,
            attention=self.attention and fmt == "qoperator",
            embeddings=self.embeddings and fmt == "qoperator",
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as the quantization report records them."""
        settings = dataclasses.asdict(self)
        del settings["description"]
        return settings


_CPU_VNNI = QuantizerSettings(
    preset="cpu-vnni",
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
)

PRESETS: dict[str, QuantizerSettings] = {
    "cpu-vnni": _CPU_VNNI,
    "cpu-avx2": dataclasses.replace(
        _CPU_VNNI,
        preset="cpu-avx2",
        # Without VNNI, u8 x s8 products are summed in pairs into int16 (vpmaddubsw) and can saturate;
        # 7-bit weights avoid that.
        reduce_range=True,
        description="x86 with AVX2 and no VNNI: like cpu-vnni with 7-bit weights (reduce_range)",
    ),
    "arm64": dataclasses.replace(
        _CPU_VNNI,
        preset="arm64",
        description="ARM64 (NEON dot product / i8mm): u8 x s8 integer operators, per-channel",
    ),
    "tensorrt": dataclasses.replace(
        _CPU_VNNI,
        preset="tensorrt",
        format="qdq",
        activation_type="int8",
        # TensorRT only accepts symmetric int8 (zero point 0) in explicit-quantization QDQ graphs.
        symmetric_activations=True,
        attention=False,
        embeddings=False,
        cpu_kernels=False,
        description="TensorRT / GPU: symmetric S8S8 QDQ, per-channel weights",
    ),
}


def check_choice(kind: str, value: str, known: tuple[str, ...] | list[str]) -> str:
    if value not in known:
        raise UserError(f"unknown {kind} {value!r}; known {kind}s: {', '.join(known)}")
    return value


# The default: the preset of the CPU this runs on, resolved when the settings are read.
AUTO_PRESET = "auto"
PRESET_NAMES = (*PRESETS, AUTO_PRESET)
# CPU class -> preset. Plain x86 without AVX2 takes 7-bit weights as well: its kernels widen in
# 16 bits too.
_HOST_PRESETS = {"x86-vnni": "cpu-vnni", "x86-avx2": "cpu-avx2", "x86": "cpu-avx2", "arm64": "arm64"}


def host_preset(trained_for_full_range: bool = False) -> str:
    """The preset ``auto`` stands for on this CPU. A QAT student (``trained_for_full_range``) keeps
    the full 8-bit weights it was trained with: 7 bits would not compute what was trained."""
    name = _HOST_PRESETS.get(cpu_class(), "cpu-vnni")
    if trained_for_full_range and name == "cpu-avx2":
        logger.warning(
            "this CPU has no VNNI: onnxruntime sums u8 x s8 products in int16 and may saturate, so the "
            "int8 graph of a QAT student can differ slightly from the trained model (docs/QAT.md)"
        )
        return "cpu-vnni"
    return name


def get_preset(name: str, trained_for_full_range: bool = False) -> QuantizerSettings:
    """A preset by name; ``auto`` resolves to :func:`host_preset`."""
    check_choice("preset", name, PRESET_NAMES)
    if name == AUTO_PRESET:
        name = host_preset(trained_for_full_range)
    return PRESETS[name]
