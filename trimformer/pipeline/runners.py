"""Uniform "run this model on these feeds" over onnxruntime sessions and PyTorch sources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
import torch

from ..artifact import ModelArtifact
from ..errors import UserError
from ..onnx_io import load_onnx
from ..sources import LoadedSource

__all__ = ["PROVIDERS", "ModelRunner", "OrtRunner", "TorchRunner", "available_providers", "resolve_provider"]

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}
_SHORT = {v: k for k, v in PROVIDERS.items()}


def available_providers(installed: list[str] | None = None) -> list[str]:
    names = ort.get_available_providers() if installed is None else installed
    return [_SHORT.get(n, n) for n in names]


def resolve_provider(name: str, installed: list[str] | None = None) -> str:
    """Short name -> onnxruntime provider, refusing ones the installed onnxruntime lacks."""
    key = name.strip().lower()
    if key not in PROVIDERS:
        raise UserError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    have = ort.get_available_providers() if installed is None else installed
    if PROVIDERS[key] not in have:
        raise UserError(
            f"provider {key!r} is not available in the installed onnxruntime (it has: "
            f"{', '.join(available_providers(have))}); install the onnxruntime build for it"
        )
    return PROVIDERS[key]


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ModelRunner(Protocol):
    input_names: tuple[str, ...]
    provider: str

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


class OrtRunner:
    """One onnxruntime session with a fixed thread count."""

    def __init__(self, artifact: ModelArtifact, provider: str = "cpu", threads: int | None = None) -> None:
        self.provider = provider
        self.threads = threads or default_threads()
        provider_name = resolve_provider(provider)
        # Checks external-data paths and catches truncated files before onnxruntime sees them.
        load_onnx(artifact.model_path, load_weights=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(artifact.model_path), options, providers=[provider_name])
        except Exception as exc:
            raise UserError(
                f"onnxruntime cannot load {artifact.model_path}: {str(exc).splitlines()[0][:300]}"
            ) from exc
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {n: feeds[n] for n in self.input_names})[0]


class TorchRunner:
    """A PyTorch source as a reference, run under inference mode with a fixed thread count."""

    def __init__(self, source: LoadedSource, threads: int | None = None) -> None:
        self.source = source.eval()
        self.provider = "pytorch-cpu"
        self.threads = threads or default_threads()
        self.input_names = source.io.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.source.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        finally:
            torch.set_num_threads(previous)
        tensor = out if isinstance(out, torch.Tensor) else out[0]
        return tensor.float().numpy()


def model_size_mb(path: Path) -> float:
    if (path / "trimformer.json").is_file():
        return round(ModelArtifact.open(path).size_bytes() / 1e6, 3)
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    return round(total / 1e6, 3)
