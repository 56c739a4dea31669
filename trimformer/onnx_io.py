"""Loading and saving ONNX files safely.

External-data references are checked before a single byte of them is read: a location that is
absolute, climbs out with ``..`` or resolves (through a symlink) outside the model's folder is
refused (CVE-2022-25882, CVE-2024-27318). Truncated or corrupt files become a one-line UserError.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from trimformer.errors import UserError

__all__ = ["TWO_GB", "check_external_data", "load_onnx", "probe_onnxruntime", "save_onnx"]

logger = logging.getLogger(__name__)

# protobuf refuses messages over 2 GiB; bigger models must keep their weights in a side file.
TWO_GB = 2**31 - 1024


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors: list[onnx.TensorProto] = []
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors.extend(t for t in graph.initializer if uses_external_data(t))
        for node in graph.node:
            for attr in node.attribute:
                if attr.t is not None and uses_external_data(attr.t):
                    tensors.append(attr.t)
                graphs.extend(attr.graphs)
                if attr.HasField("g"):
                    graphs.append(attr.g)
    return tensors


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Return the external-data files a model uses, refusing any outside ``base_dir``."""
    base = base_dir.resolve()
    files: set[Path] = set()
    for tensor in _external_tensors(model):
        location = ExternalDataInfo(tensor).location
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise UserError(
                f"refusing model: tensor {tensor.name!r} points to external data at an absolute path "
                f"{location!r}; external data must lie inside the model's folder"
            )
        if ".." in Path(location).parts or ".." in location.replace("\\", "/").split("/"):
            raise UserError(
                f"refusing model: tensor {tensor.name!r} points to external data {location!r} outside the "
                "model's folder ('..' is not allowed)"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise UserError(
                f"refusing model: external data {location!r} of tensor {tensor.name!r} resolves outside "
                "the model's folder (symlink)"
            )
        if not target.is_file():
            raise UserError(
                f"model is incomplete: external data file {location!r} is missing next to model.onnx"
            )
        files.add(target)
    return sorted(files)


def load_onnx(path: Path, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, checking its external data paths first."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no ONNX model at {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX model (corrupt or truncated): {exc}") from exc
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path} is not a readable ONNX model (it holds no graph); re-export it")
    check_external_data(model, path.parent)
    if load_weights and _external_tensors(model):
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


_PROBE = (
    "import sys, onnxruntime as ort\n"
    "o = ort.SessionOptions(); o.log_severity_level = 4\n"
    "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL\n"
    "try:\n"
    "    ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
    "except Exception as exc:\n"
    "    print(' '.join(str(exc).split())[:300]); sys.exit(3)\n"
)


def probe_onnxruntime(path: Path, timeout: float = 300.0) -> None:
    """Open the model in a child process first, so a malformed graph that crashes onnxruntime
    natively (onnxruntime#4585, #23258) becomes a one-line error here instead of killing us."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise UserError(f"onnxruntime did not finish loading {path} within {timeout:.0f} s") from exc
    if done.returncode == 0:
        return
    if done.returncode == 3:
        raise UserError(f"onnxruntime cannot load {path}: {done.stdout.strip()}")
    raise UserError(
        f"onnxruntime crashed while loading {path} (exit {done.returncode}); the model is malformed"
    )


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save, spilling weights into ``<name>.data`` when the model is too big for one protobuf."""
    path = Path(path)
    if model.ByteSize() > TWO_GB:
        logger.info("model over 2 GB: writing weights to %s.data", path.name)
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
