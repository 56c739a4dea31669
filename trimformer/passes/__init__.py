"""ONNX -> ONNX graph passes (one module each) and the helpers they share."""

from __future__ import annotations

from .base import PASS_REGISTRY, PassConfig, PassContext, PassReport, apply_pass, get_pass, register_pass

__all__ = ["PASS_REGISTRY", "PassConfig", "PassContext", "PassReport", "apply_pass", "get_pass", "register_pass"]
