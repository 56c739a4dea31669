"""What a deployed service imports: verify a bundle, load it, turn texts into labels or embeddings.

Depends on onnxruntime, numpy, tokenizers and the standard library only (no torch, onnx or
pydantic), so a service image stays small::

    from trimformer.runtime import Predictor

    predictor = Predictor("dist/sentiment")          # or dist/sentiment.tar.gz
    predictor.predict(["great phone", "awful battery"])
    # [Prediction(label='positive', score=0.97, scores={...}), ...]
"""

from __future__ import annotations

from trimformer.runtime.bundle import (
    BUNDLE_FORMAT,
    MANIFEST,
    MANIFEST_DIGEST,
    BundleError,
    VerifiedBundle,
    check_bundle_folder,
)
from trimformer.runtime.predictor import SMOKE_TEXTS, Prediction, Predictor, open_verified
from trimformer.runtime.verify import verify_bundle

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST",
    "MANIFEST_DIGEST",
    "SMOKE_TEXTS",
    "BundleError",
    "Prediction",
    "Predictor",
    "VerifiedBundle",
    "check_bundle_folder",
    "open_verified",
    "verify_bundle",
]
