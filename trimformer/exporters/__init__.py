"""PyTorch -> ONNX export with dynamic axes and a parity check against PyTorch."""

from __future__ import annotations

from trimformer.exporters.configs import DEFAULT_OPSET, ExportConfig, export_config_for
from trimformer.exporters.parity import ParityResult, check_parity, random_feeds
from trimformer.exporters.torch_export import ExportResult, export_model, export_source

__all__ = [
    "DEFAULT_OPSET",
    "ExportConfig",
    "ExportResult",
    "ParityResult",
    "check_parity",
    "export_config_for",
    "export_model",
    "export_source",
    "random_feeds",
]
