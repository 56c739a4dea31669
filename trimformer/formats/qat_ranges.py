"""The QAT ranges file (``qat_ranges.json``): activation ranges learned in quantization-aware training.

``trimformer distill --qat`` writes it next to the student's weights (:mod:`trimformer.training.qat`),
``trimformer export`` copies it into the artifact, and ``quantize --ranges-from-training`` reads
it (:mod:`trimformer.passes.quantize.training_ranges`). Both sides import this one schema; it
needs neither torch nor onnx.

One entry per encoder Linear in ``linears``: its PyTorch path (``module``), the activation
quantizer it shares (``quantizer``), the input range it was trained with (``lowest``,
``highest``) and :func:`weight_digest` of its weight as the exported graph stores it
(``weight_sha256``), by which the quantize pass finds the graph node of each Linear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trimformer.errors import UserError
from trimformer.fsutil import sha256_bytes

__all__ = ["QAT_RANGES_FILE", "RANGES_FORMAT", "read_training_ranges", "weight_digest"]

QAT_RANGES_FILE = "qat_ranges.json"
RANGES_FORMAT = "trimformer-qat-ranges/1"
_ENTRY_KEYS = ("module", "quantizer", "weight_sha256", "lowest", "highest")


def weight_digest(weight: np.ndarray) -> str:
    """sha256 of a float32 weight's shape and bytes, in the layout given (the graph's ``[in, out]``)."""
    array = np.ascontiguousarray(weight, dtype=np.float32)
    return sha256_bytes(repr(tuple(array.shape)).encode() + array.tobytes())


def read_training_ranges(path: Path) -> dict[str, Any]:
    """Read and check a ranges file; a malformed one is a one-line error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({type(exc).__name__}); distill again with --qat") from exc
    if not isinstance(data, dict) or data.get("format") != RANGES_FORMAT:
        raise UserError(f"{path} is not a trimformer QAT ranges file (format {RANGES_FORMAT!r} expected)")
    linears = data.get("linears")
    if not isinstance(linears, list) or not linears:
        raise UserError(f"{path} lists no trained Linear layers; distill again with --qat")
    for i, entry in enumerate(linears):
        _check_entry(entry, i, path)
    return data


def _check_entry(entry: Any, index: int, path: Path) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{path}: entry {index} of 'linears' is not an object; distill again with --qat")
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
        raise UserError(f"{path}: entry {index} of 'linears' lacks {missing[0]!r}; distill again with --qat")
    try:
        lo, hi = float(entry["lowest"]), float(entry["highest"])
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{path}: entry {index} of 'linears' has a non-numeric range; distill again with --qat"
        ) from exc
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise UserError(f"{path}: {entry['module']} has an invalid range [{lo}, {hi}]")
