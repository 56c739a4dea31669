"""onnxruntime sessions: the one provider table, the one resolver, and the one place session
options are chosen, for bundles and for every pass, check and benchmark that runs a model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol

import onnxruntime as ort

from trimformer.errors import UserError
from trimformer.runtime.bundle import BundleError

__all__ = [
    "PROVIDERS",
    "Optimization",
    "available_providers",
    "cpu_session",
    "make_session",
    "resolve_provider",
    "resolve_providers",
    "session_options",
]

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
_SHORT = {full: short for short, full in PROVIDERS.items()}

Optimization = Literal["all", "basic", "disabled"]
_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class _Serializable(Protocol):
    def SerializeToString(self) -> bytes: ...


def available_providers(installed: Iterable[str] | None = None) -> list[str]:
    """The installed providers by their short names (full names for ones the table lacks)."""
    names = ort.get_available_providers() if installed is None else list(installed)
    return [_SHORT.get(n, n) for n in names]


def resolve_provider(name: str, installed: Iterable[str] | None = None) -> str:
    """A short name (``cpu``) or onnxruntime's full name -> the full name, refusing unknown
    names and providers the installed onnxruntime lacks."""
    key = name.strip()
    full = PROVIDERS.get(key.lower()) or (key if key in _SHORT else None)
    if full is None:
        raise UserError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    have = ort.get_available_providers() if installed is None else list(installed)
    if full not in have:
        raise UserError(
            f"provider {_SHORT[full]!r} is not available in the installed onnxruntime (it has: "
            f"{', '.join(available_providers(have))}); install the onnxruntime build for it"
        )
    return full


def resolve_providers(provider: str | list[str] | tuple[str, ...]) -> list[str]:
    """One or several provider names -> onnxruntime names (see :func:`resolve_provider`)."""
    wanted = [provider] if isinstance(provider, str) else list(provider)
    if not wanted:
        raise UserError("no execution provider given; use 'cpu' or another installed provider")
    return [resolve_provider(name) for name in wanted]


def session_options(
    *,
    threads: int | None = None,
    optimization: Optimization = "all",
    sequential: bool = False,
    spinning: bool = True,
    mem_pattern: bool = True,
) -> ort.SessionOptions:
    """Session options; quiet logs always (onnxruntime's warnings are not the user's problem)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = _LEVELS[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
    if sequential:
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        # Calibration and checks alternate Python and onnxruntime work; spinning threads
        # would take the cores the Python side needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Text batches change shape on every call; memory patterns are cached per shape and would
    # make a long-running service's memory creep up with every new (batch, length) it sees.
    options.enable_mem_pattern = mem_pattern
    return options


def cpu_session(
    model: _Serializable | bytes | str | Path,
    *,
    threads: int | None = None,
    optimization: Optimization = "all",
    spinning: bool = True,
) -> ort.InferenceSession:
    """A CPU session over a ModelProto, serialized bytes, or a model file (use a file when the
    model has external data: onnxruntime resolves it next to the file)."""
    source: bytes | str
    if isinstance(model, Path):
        source = str(model)
    elif isinstance(model, bytes | str):
        source = model
    else:
        source = model.SerializeToString()
    options = session_options(threads=threads, optimization=optimization, spinning=spinning)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def make_session(
    model: bytes | Path, providers: list[str], threads: int | None = None, label: str = "model"
) -> ort.InferenceSession:
    """A bundle's session; ``model`` is the verified bytes (ONNX or ORT format) or, for models
    with external data only, the path of a verified folder's model file."""
    options = session_options(threads=threads, sequential=True, mem_pattern=False)
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), options, providers=providers
        )
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise BundleError(f"onnxruntime cannot load the bundle's {label}: {first}") from exc
