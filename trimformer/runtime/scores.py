"""Logits -> probabilities: the one softmax of the runtime.

Pure numpy and the standard library, so that the Triton repository's Python backend can ship this
file as it is (``trimformer.packaging.triton``) and score exactly as :class:`Predictor` does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["probabilities"]


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 (scores summing to 1 however large the logits)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
