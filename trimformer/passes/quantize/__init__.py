"""The ``quantize`` pass: static int8 with onnxruntime's calibrators and quantizers."""

from __future__ import annotations

from trimformer.passes.quantize.int8 import *  # noqa: F403
from trimformer.passes.quantize.int8 import __all__ as __all__
