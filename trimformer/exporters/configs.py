"""Per-family export settings: inputs, outputs, dynamic axes, opset and tolerance.

Most families differ only in their inputs (DistilBERT and RoBERTa take no token_type_ids), which
the loaders already declare; the config adds what the export needs on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trimformer.formats.onnx_ops import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from trimformer.sources import LoadedSource

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "ExportConfig", "export_config_for"]


@dataclass(frozen=True)
class ExportConfig:
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    opset: int = DEFAULT_OPSET
    # Per-output absolute tolerance for the parity check.
    atol: dict[str, float] = field(default_factory=dict)
    # Shapes (batch, sequence) to check parity on; deliberately not the traced one.
    parity_shapes: tuple[tuple[int, int], ...] = ((3, 17), (1, 128))
    trace_shape: tuple[int, int] = (2, 16)


def export_config_for(source: LoadedSource, opset: int = DEFAULT_OPSET, atol: float = 1e-4) -> ExportConfig:
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in source.io.input_names}
    for name, names in source.io.output_axes.items():
        axes[name] = {i: str(a) for i, a in enumerate(names) if isinstance(a, str)}
    longest = min(128, source.max_length)
    return ExportConfig(
        input_names=source.io.input_names,
        output_names=source.io.output_names,
        dynamic_axes=axes,
        opset=opset,
        atol=dict.fromkeys(source.io.output_names, atol),
        parity_shapes=((3, min(17, longest)), (1, longest)),
    )
