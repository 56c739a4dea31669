"""Uniform "run this model on these feeds" over onnxruntime sessions.

A PyTorch reference has the same :class:`ModelRunner` shape (``trimformer.sources.runner.TorchRunner``)
but lives on the torch side; validation is handed one and never imports torch. Providers are
named and resolved by :mod:`trimformer.runtime.session`, the one provider table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from trimformer.artifact import ModelArtifact
from trimformer.errors import UserError
from trimformer.onnx_io import load_onnx, probe_onnxruntime
from trimformer.runtime.session import resolve_provider, session_options

__all__ = [
    "ModelRunner",
    "OrtRunner",
    "ProviderOptions",
    "default_threads",
    "model_size_mb",
    "provider_chain",
]


@dataclass(frozen=True)
class ProviderOptions:
    """Options for the GPU providers; ignored by the CPU provider."""

    device_id: int = 0
    trt_cache: str | None = None
    trt_fp16: bool = False
    trt_int8: bool = False


def provider_chain(name: str, options: ProviderOptions, installed: list[str] | None = None) -> list[Any]:
    """The providers list for an InferenceSession: the asked-for one with its options, then fallbacks.

    TensorRT falls back to CUDA for the nodes it does not take, and everything falls back to CPU.
    """
    main = resolve_provider(name, installed)
    have = ort.get_available_providers() if installed is None else installed
    cuda = ("CUDAExecutionProvider", {"device_id": options.device_id})
    if main == "TensorrtExecutionProvider":
        trt: dict[str, Any] = {
            "device_id": options.device_id,
            "trt_fp16_enable": options.trt_fp16,
            "trt_int8_enable": options.trt_int8,
        }
        if options.trt_cache:
            trt.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": options.trt_cache})
        chain: list[Any] = [(main, trt)]
        if "CUDAExecutionProvider" in have:
            chain.append(cuda)
    elif main == "CUDAExecutionProvider":
        chain = [cuda]
    else:
        chain = [main]
    if main != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")
    return chain


def device_type(name: str) -> str:
    return "cuda" if name in ("cuda", "tensorrt") else "cpu"


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ModelRunner(Protocol):
    input_names: tuple[str, ...]
    provider: str

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...

    def timed(self, feeds: dict[str, np.ndarray]) -> Callable[[], object]: ...


class OrtRunner:
    """One onnxruntime session with a fixed thread count."""

    def __init__(
        self,
        artifact: ModelArtifact,
        provider: str = "cpu",
        threads: int | None = None,
        options: ProviderOptions | None = None,
    ) -> None:
        self.provider = provider
        self.threads = threads or default_threads()
        self.options = options or ProviderOptions()
        chain = provider_chain(provider, self.options)
        self.device = device_type(provider)
        # Checks external-data paths and catches truncated files before onnxruntime sees them,
        # then lets a child process take any native crash of onnxruntime on a malformed graph.
        load_onnx(artifact.model_path, load_weights=False)
        probe_onnxruntime(artifact.model_path)
        # Sequential with one inter-op thread: the measured latency is the model's, not scheduling noise.
        options = session_options(threads=self.threads, sequential=True)
        try:
            self.session = ort.InferenceSession(str(artifact.model_path), options, providers=chain)
        except Exception as exc:
            raise UserError(
                f"onnxruntime cannot load {artifact.model_path}: {str(exc).splitlines()[0][:300]}"
            ) from exc
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.device == "cpu":
            return self.session.run([self.output_name], {n: feeds[n] for n in self.input_names})[0]
        binding = self._bind(feeds)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _bind(self, feeds: dict[str, np.ndarray]) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name in self.input_names:
            value = ort.OrtValue.ortvalue_from_numpy(feeds[name], self.device, self.options.device_id)
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output_name, self.device, self.options.device_id)
        return binding

    def timed(self, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
        """A zero-argument call to time. On a GPU the inputs are copied to the device once and the
        output stays there (IOBinding), so host transfers are kept out of the latency."""
        if self.device == "cpu":
            picked = {n: feeds[n] for n in self.input_names}
            return lambda: self.session.run([self.output_name], picked)
        binding = self._bind(feeds)
        return lambda: self.session.run_with_iobinding(binding)


def model_size_mb(path: Path) -> float:
    if (path / "trimformer.json").is_file():
        return round(ModelArtifact.open(path).size_bytes() / 1e6, 3)
    total = sum(
        p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")
    )
    return round(total / 1e6, 3)
