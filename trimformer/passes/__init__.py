"""ONNX -> ONNX graph passes (one module each) and the helpers they share.

Importing the package registers every pass: ``fp16``, ``fuse``, ``quantize``, ``prune``,
``weight-only``, ``fuse-decoder``.
None of them imports torch.
"""

from __future__ import annotations

from trimformer.passes import fp16, fuse, prune, quantize, trim_vocab  # noqa: F401  (registration)
from trimformer.passes.base import (
    PASS_REGISTRY,
    PassConfig,
    PassContext,
    PassEntry,
    PassReport,
    apply_pass,
    get_pass,
    pass_order,
    register_pass,
)
from trimformer.passes.fuse import decoder  # noqa: F401  (registration)
from trimformer.passes.quantize import weight_only  # noqa: F401  (registration)

__all__ = [
    "PASS_REGISTRY",
    "PassConfig",
    "PassContext",
    "PassEntry",
    "PassReport",
    "apply_pass",
    "get_pass",
    "pass_order",
    "register_pass",
]
