"""The ``fuse`` pass: transformer fusions through onnxruntime's maintained optimizer."""

from __future__ import annotations

from trimformer.passes.fuse.fusion import *  # noqa: F403
from trimformer.passes.fuse.fusion import __all__ as __all__
