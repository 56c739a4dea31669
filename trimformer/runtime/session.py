"""onnxruntime sessions for bundles: provider names, options, and loading from verified bytes."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from trimformer.errors import UserError
from trimformer.runtime.bundle import BundleError

__all__ = ["PROVIDER_NAMES", "make_session", "resolve_providers"]

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def resolve_providers(provider: str | list[str] | tuple[str, ...]) -> list[str]:
    """Short or full provider names -> onnxruntime names, refusing those not installed."""
    wanted = [provider] if isinstance(provider, str) else list(provider)
    if not wanted:
        raise UserError("no execution provider given; use 'cpu' or another installed provider")
    have = ort.get_available_providers()
    resolved = []
    for name in wanted:
        full = PROVIDER_NAMES.get(name.strip().lower(), name.strip())
        if full not in have:
            raise UserError(
                f"execution provider {name!r} is not available in the installed onnxruntime "
                f"(it has: {', '.join(have)}); install the onnxruntime build for it"
            )
        resolved.append(full)
    return resolved


def make_session(
    model: bytes | Path, providers: list[str], threads: int | None = None, label: str = "model"
) -> ort.InferenceSession:
    """One session; ``model`` is the verified bytes (ONNX or ORT format) or, for models with
    external data only, the path of a verified folder's model file."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Text batches change shape on every call; memory patterns are cached per shape and would
    # make a long-running service's memory creep up with every new (batch, length) it sees.
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), options, providers=providers
        )
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise BundleError(f"onnxruntime cannot load the bundle's {label}: {first}") from exc
