"""A bundle's NVIDIA Triton model repository (``trimformer package --layout triton``).

Written inside the bundle folder, under ``triton/``, so the manifest hashes every file of it and
``trimformer verify`` checks it with the rest. For a model named NAME (``--name``, else the bundle
folder's name), four entries::

    triton/NAME/config.pbtxt                 ensemble: text (TYPE_STRING) -> label + scores, or the embedding
    triton/NAME/1/README                     (Triton wants the version folder; an ensemble has no files)
    triton/NAME_tokenizer/config.pbtxt       Python backend, role "tokenize": text -> the graph's inputs
    triton/NAME_tokenizer/1/model.py         trimformer/runtime/triton_model.py
    triton/NAME_tokenizer/1/trimformer_encoding.py, tokenizer.json, trimformer_settings.json
    triton/NAME_onnx/config.pbtxt            platform onnxruntime_onnx, dynamic batching
    triton/NAME_onnx/1/model.onnx            the bundle's model.onnx, byte for byte
    triton/NAME_scores/...                   classifiers only: Python backend, role "scores"

The io names are ``trimformer serve``'s (``text`` in; ``label`` and ``scores``, or the graph's
embedding output, out), so one Open Inference Protocol request body works on both servers. The
Python backend runs the runtime's own encoder and softmax (the files are copied from
``trimformer/runtime``), so Triton tokenizes and scores exactly as ``Predictor`` does. Every graph
dimension but the batch is taken from the manifest's io (-1 where it is dynamic); the batch is
Triton's implicit first dimension (``max_batch_size`` > 0) when every input and output has a
dynamic first dimension, else the model is served unbatched (``max_batch_size: 0``, full dims).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimformer.errors import UserError
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.runtime import encoding, scores, triton_model
from trimformer.runtime.manifest import ManifestError, ModelSpec, TensorSpec, check_model_name

__all__ = [
    "LAYOUTS",
    "TRITON_FOLDER",
    "TritonOptions",
    "TritonSource",
    "check_triton",
    "write_triton_repository",
]

# "kserve": this repository and an InferenceService that serves it (trimformer.packaging.kserve).
LAYOUTS = ("triton", "kserve")
TRITON_FOLDER = "triton"
VERSION = "1"
# numpy dtype names (the manifest's) -> Triton's data types.
_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TritonOptions:
    """The repository's serving settings: what ``config.pbtxt`` says about batching and instances."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 1.0
    kind: str = "cpu"  # instance_group: KIND_CPU or KIND_GPU
    instances: int = 1
    threads: int = 0  # onnxruntime's intra-op threads per instance; 0: its own default

    def check(self) -> None:
        checks = [
            (self.max_batch_size >= 1, f"--triton-max-batch-size must be at least 1, got {self.max_batch_size}"),
            (0 <= self.max_queue_delay_ms < 1e6, f"--triton-max-queue-delay-ms must be 0 or more, under 1e6, got {self.max_queue_delay_ms}"),
            (self.kind in ("cpu", "gpu"), f"--triton-kind is cpu or gpu, got {self.kind!r}"),
            (self.instances >= 1, f"--triton-instances must be at least 1, got {self.instances}"),
            (self.threads >= 0, f"--triton-threads must be 0 (onnxruntime's default) or more, got {self.threads}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def preferred_batch_sizes(self) -> list[int]:
        """Powers of two from 4 up to the largest batch, and the largest itself."""
        sizes = [size for size in (4, 8, 16, 32, 64, 128, 256) if size < self.max_batch_size]
        return [*sizes, self.max_batch_size]


def check_triton(task: str, name: str, options: TritonOptions) -> None:
    """Everything the repository needs, checked before a byte is written."""
    if task == CAUSAL_LM:
        raise UserError(
            "--layout triton does not support causal language models yet; package without --layout "
            "(onnxruntime-genai runs the bundle: it carries genai_config.json)"
        )
    options.check()
    for entry in _entry_names(name, task).values():
        try:
            check_model_name(entry)
        except ManifestError as exc:
            raise UserError(f"Triton would reject the repository's model name: {exc}; pass --name") from exc


def _entry_names(name: str, task: str) -> dict[str, str]:
    names = {"ensemble": name, "tokenizer": f"{name}_tokenizer", "onnx": f"{name}_onnx"}
    if task == "sequence-classification":
        names["scores"] = f"{name}_scores"
    return names


def _batched(model: ModelSpec) -> bool:
    return all(not isinstance(t.shape[0], int) for t in (*model.inputs, *model.outputs) if t.shape)


def _dims(tensor: TensorSpec, batched: bool) -> list[int]:
    dims = tensor.fixed_shape
    return dims[1:] if batched else dims


def _text_dims(batched: bool) -> list[int]:
    """One text a row under Triton's batching; a list of texts otherwise."""
    return [1] if batched else [-1]


def _tensor(name: str, data_type: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ] }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]"


def _data_type(tensor: TensorSpec) -> str:
    if tensor.dtype not in _TRITON_TYPES:
        raise UserError(
            f"the graph's {tensor.name} is {tensor.dtype}, which a Triton repository cannot declare"
        )
    return _TRITON_TYPES[tensor.dtype]


def _header(name: str, batch: int, platform: str | None = None, backend: str | None = None) -> list[str]:
    lines = [f'name: "{name}"']
    if platform:
        lines.append(f'platform: "{platform}"')
    if backend:
        lines.append(f'backend: "{backend}"')
    return [*lines, f"max_batch_size: {batch}"]


def _instances(options: TritonOptions) -> str:
    return f"instance_group [ {{ count: {options.instances} kind: KIND_{options.kind.upper()} }} ]"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


def _onnx_config(name: str, model: ModelSpec, options: TritonOptions) -> str:
    batched = _batched(model)
    batch = options.max_batch_size if batched else 0
    inputs = [_tensor(t.name, _data_type(t), _dims(t, batched)) for t in model.inputs]
    outputs = [_tensor(t.name, _data_type(t), _dims(t, batched)) for t in model.outputs]
    lines = [*_header(name, batch, platform="onnxruntime_onnx"), _io("input", inputs), _io("output", outputs)]
    if batched:
        delay_us = round(options.max_queue_delay_ms * 1000)
        sizes = ", ".join(map(str, options.preferred_batch_sizes))
        lines.append(
            f"dynamic_batching {{ preferred_batch_size: [ {sizes} ] max_queue_delay_microseconds: {delay_us} }}"
        )
    lines += [
        _instances(options),
        _parameter("intra_op_thread_count", str(options.threads)),
        _parameter("inter_op_thread_count", "1"),
    ]
    return "\n".join(lines) + "\n"


def _python_config(
    name: str, role: str, batch: int, inputs: list[str], outputs: list[str], options: TritonOptions
) -> str:
    lines = [
        *_header(name, batch, backend="python"),
        _io("input", inputs),
        _io("output", outputs),
        # The Python backend runs on the CPU whatever the ONNX entry's kind.
        f"instance_group [ {{ count: {options.instances} kind: KIND_CPU }} ]",
        _parameter("role", role),
    ]
    return "\n".join(lines) + "\n"


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    maps = [f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    return f'    {{ model_name: "{model}" model_version: -1 ' + " ".join(maps) + " }"


def _ensemble_config(
    names: dict[str, str], model: ModelSpec, labels: int, batch: int, outputs: list[str]
) -> str:
    graph_inputs = {t.name: t.name for t in model.inputs}
    graph_output = model.outputs[0].name
    steps = [
        _step(names["tokenizer"], {"text": "text"}, graph_inputs),
        _step(names["onnx"], graph_inputs, {graph_output: graph_output}),
    ]
    if labels:
        steps.append(_step(names["scores"], {"logits": graph_output}, {"label": "label", "scores": "scores"}))
    lines = [
        *_header(names["ensemble"], batch, platform="ensemble"),
        _io("input", [_tensor("text", "TYPE_STRING", _text_dims(batch > 0))]),
        _io("output", outputs),
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TritonSource:
    """What the repository is written from: the bundle folder being filled and its facts."""

    folder: Path
    task: str
    model: ModelSpec
    labels: tuple[str, ...]
    tokenizer_file: str
    max_length: int
    pad_token_id: int


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _python_entry(entry: Path, config: str, settings: dict[str, Any]) -> None:
    version = entry / VERSION
    _write(entry / "config.pbtxt", config)
    _write(version / "model.py", Path(triton_model.__file__).read_text(encoding="utf-8"))
    _write(version / triton_model.SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    for module, file_name in ((encoding, triton_model.ENCODING_FILE), (scores, triton_model.SCORES_FILE)):
        _write(version / file_name, Path(module.__file__ or "").read_text(encoding="utf-8"))


def write_triton_repository(bundle: TritonSource, name: str, options: TritonOptions) -> dict[str, Any]:
    """The repository under ``bundle.folder / "triton"``; returns what the manifest records of it."""
    root = bundle.folder / TRITON_FOLDER
    names = _entry_names(name, bundle.task)
    model = bundle.model
    batched = _batched(model)
    batch = options.max_batch_size if batched else 0
    token_outputs = [_tensor(t.name, "TYPE_INT64", [-1] if batched else [-1, -1]) for t in model.inputs]
    text_input = [_tensor("text", "TYPE_STRING", _text_dims(batched))]
    _write(root / names["onnx"] / "config.pbtxt", _onnx_config(names["onnx"], model, options))
    (root / names["onnx"] / VERSION).mkdir(parents=True)
    shutil.copyfile(bundle.folder / model.file, root / names["onnx"] / VERSION / "model.onnx")
    tokenizer_entry = root / names["tokenizer"]
    settings = {
        "tokenizer_file": "tokenizer.json",
        "input_names": [t.name for t in model.inputs],
        "max_length": bundle.max_length,
        "pad_token_id": bundle.pad_token_id,
        "labels": list(bundle.labels),
    }
    config = _python_config(names["tokenizer"], "tokenize", batch, text_input, token_outputs, options)
    _python_entry(tokenizer_entry, config, settings)
    shutil.copyfile(bundle.folder / bundle.tokenizer_file, tokenizer_entry / VERSION / "tokenizer.json")
    output = model.outputs[0]
    if bundle.labels:
        width = len(bundle.labels)
        logits = [_tensor("logits", _data_type(output), _dims(output, batched))]
        results = [
            _tensor("label", "TYPE_STRING", _text_dims(batched)),
            _tensor("scores", "TYPE_FP32", [width] if batched else [-1, width]),
        ]
        config = _python_config(names["scores"], "scores", batch, logits, results, options)
        _python_entry(root / names["scores"], config, settings)
    else:
        results = [_tensor(output.name, _data_type(output), _dims(output, batched))]
    ensemble = _ensemble_config(names, model, len(bundle.labels), batch, results)
    _write(root / names["ensemble"] / "config.pbtxt", ensemble)
    _write(
        root / names["ensemble"] / VERSION / "README",
        "Triton needs this version folder; an ensemble's steps are the other entries.\n",
    )
    return {
        "repository": TRITON_FOLDER,
        "models": names,
        "max_batch_size": batch,
        "kind": options.kind,
    }
