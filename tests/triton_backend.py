"""Triton's side of the repository tests: its config schema and a stand-in of its Python backend.

``model_config_pb2`` is Triton's ``model_config.proto`` as ``tritonclient`` ships it; the stand-in of
``triton_python_backend_utils`` follows the Python backend's documented API (``Tensor``,
``InferenceResponse``, ``TritonError``, ``get_input_tensor_by_name``, ``initialize(args)`` with
``model_config`` as JSON); ``run_ensemble`` runs an ensemble's steps as its ``ensemble_scheduling``
says, the ONNX entries in onnxruntime.
"""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from google.protobuf import json_format, text_format


def model_config_pb2() -> Any:
    """Triton's ModelConfig message, from tritonclient's copy of model_config.proto (loaded by path:
    ``tritonclient.grpc``'s own __init__ needs grpcio, which the schema does not)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(config: Path) -> Any:
    return text_format.Parse(config.read_text(), model_config_pb2().ModelConfig())


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Error:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: _Error | None = None) -> None:
        self._tensors, self._error = output_tensors or [], error

    def output_tensors(self) -> list[_Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> _Error | None:
        return self._error


class _Request:
    def __init__(self, tensors: list[_Tensor]) -> None:
        self._tensors = tensors

    def inputs(self) -> list[_Tensor]:
        return self._tensors


def stand_in() -> types.ModuleType:
    """triton_python_backend_utils as its README documents the parts model.py uses."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.TritonError = _Error  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: next(  # type: ignore[attr-defined]
        (t for t in request.inputs() if t.name() == name), None
    )
    return module


def _python_model(entry: Path, config: Any) -> Any:
    """The entry's model.py as Triton's Python backend loads it: by path, then ``initialize``."""
    spec = importlib.util.spec_from_file_location(f"triton_{entry.name}", entry / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    args = {
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(entry),
        "model_version": "1",
        "model_name": entry.name,
        "model_instance_kind": "CPU",
    }
    model.initialize(args)
    return model


def run_ensemble(
    repository: Path, name: str, texts: list[str] | dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The ensemble's steps in order, each fed through its input_map and read through its output_map;
    ``texts`` become the ``text`` input, one a row (or give the inputs as arrays)."""
    ensemble = parse(repository / name / "config.pbtxt")
    values = (
        dict(texts)
        if isinstance(texts, dict)
        else {"text": np.asarray([[t.encode("utf-8")] for t in texts], dtype=object)}
    )
    for step in ensemble.ensemble_scheduling.step:
        entry = repository / step.model_name
        config = parse(entry / "config.pbtxt")
        feeds = {inner: values[outer] for inner, outer in step.input_map.items()}
        if config.backend == "python":
            request = _Request([_Tensor(k, v) for k, v in feeds.items()])
            (response,) = _python_model(entry, config).execute([request])
            assert not response.has_error(), response.error().message()
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
        else:
            assert config.platform == "onnxruntime_onnx"
            session = ort.InferenceSession(
                str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
            )
            names = [o.name for o in config.output]
            outputs = dict(zip(names, session.run(names, feeds), strict=True))
        values.update({outer: outputs[inner] for inner, outer in step.output_map.items()})
    return {o.name: values[o.name] for o in ensemble.output}
