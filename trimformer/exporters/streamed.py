"""Write an ONNX file from a traced graph and the module's own tensors, one tensor at a time.

``torch.onnx.export`` with its weights builds the whole model in memory more than once: constant
folding allocates a transposed copy of every Linear weight, the protobuf holds a copy of every
tensor, and its serialization another. On a 135M-parameter decoder that peaked at 3.6x the fp32
size above the loaded model (docs/DECODERS.md). Here the exporter traces the graph only
(``export_params=False``: the weights are graph inputs named by their module path), and this module

1. folds each ``Transpose(weight)`` (how a Linear layer is exported) into a transposed initializer,
   the job constant folding did, computing one transposed tensor at a time;
2. turns the other weight inputs into initializers of the module's tensors, unchanged;
3. writes the protobuf itself: the model and graph fields serialized without initializers, then
   each initializer's header followed by its bytes straight from the tensor's memory (the
   ``raw_data`` field), so no second copy of the weights is ever held; or, asked for and always past
   2 GB (protobuf's limit), to ``model.onnx.data`` as external data, 4 KiB aligned. onnxruntime
   maps aligned external data instead of copying it out of a parsed protobuf: on the 135M-shaped
   decoder the parity session's peak fell from 1.86x to 1.2x the fp32 size (docs/DECODERS.md).

The file is an ordinary ONNX model: protobuf fields may come in any order and repeated fields may
be split, so the result parses exactly as a model serialized in one piece.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
import torch

__all__ = ["EXTERNAL_DATA_FILE", "write_with_weights"]

logger = logging.getLogger(__name__)

EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot parse a message over 2 GiB; leave room for the graph itself.
_INLINE_LIMIT = 2**31 - 64 * 2**20
_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def _is_matrix_transpose(node: onnx.NodeProto, weights: Mapping[str, torch.Tensor]) -> bool:
    if node.op_type != "Transpose" or node.input[0] not in weights or weights[node.input[0]].dim() != 2:
        return False
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
    return perm == [1, 0]


def _fold_transposes(
    graph: onnx.GraphProto, weights: Mapping[str, torch.Tensor]
) -> dict[str, tuple[str, bool]]:
    """Remove each Transpose of a 2-D weight, feeding its consumers a transposed initializer
    instead; return initializer name -> (weight name, transposed) for every weight still used."""
    renamed: dict[str, str] = {}
    folded: dict[str, tuple[str, bool]] = {}
    keep = []
    # A weight read untransposed too (a tied embedding and lm_head) keeps its Transpose node: one
    # copy in the file, and onnxruntime folds the transpose when it loads the model.
    plain_uses = {
        name for node in _all_nodes(graph) if not _is_matrix_transpose(node, weights) for name in node.input
    }
    for node in graph.node:
        if _is_matrix_transpose(node, weights) and node.input[0] not in plain_uses:
            name = f"{node.input[0]}.T"
            renamed[node.output[0]] = name
            folded[name] = (node.input[0], True)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    used: set[str] = set()
    for node in _all_nodes(graph):
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
            used.add(node.input[index])
    for output in graph.output:
        if output.name in renamed:
            raise ValueError(f"graph output {output.name} is a transposed weight; not supported")
    plain = {name: (name, False) for name in weights if name in used}
    return {**plain, **{k: v for k, v in folded.items() if k in used}}


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            for subgraph in subgraphs:
                yield from _all_nodes(subgraph)


def _array(weights: Mapping[str, torch.Tensor], source: str, transposed: bool) -> np.ndarray:
    array = weights[source].detach().contiguous().numpy()
    return np.ascontiguousarray(array.T) if transposed else array


def _shape(
    weights: Mapping[str, torch.Tensor], source: str, transposed: bool
) -> tuple[np.dtype, tuple[int, ...], int]:
    tensor = weights[source]
    shape = tuple(tensor.shape[::-1] if transposed else tensor.shape)
    dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    return dtype, shape, tensor.numel() * tensor.element_size()


def _tensor_header(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype))
    tensor.dims.extend(shape)
    return tensor


def _inline_header(name: str, dtype: np.dtype, shape: tuple[int, ...], nbytes: int) -> bytes:
    """The initializer's field bytes up to its raw data (which follows them in the file)."""
    head = _tensor_header(name, dtype, shape).SerializeToString() + _field_header(_TENSOR_RAW_DATA, nbytes)
    return _field_header(_GRAPH_INITIALIZER, len(head) + nbytes) + head


def _raw(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _external_entry(name: str, array: np.ndarray, data: IO[bytes]) -> bytes:
    """Append the raw data to ``data`` (4 KiB aligned, so onnxruntime may map it) and return the
    initializer field that points there."""
    offset = -data.tell() % 4096
    data.write(b"\0" * offset)
    start = data.tell()
    data.write(_raw(array))
    tensor = _tensor_header(name, array.dtype, array.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (
        ("location", EXTERNAL_DATA_FILE),
        ("offset", str(start)),
        ("length", str(array.nbytes)),
    ):
        tensor.external_data.add(key=key, value=value)
    body = tensor.SerializeToString()
    return _field_header(_GRAPH_INITIALIZER, len(body)) + body


def write_with_weights(
    graph_file: Path, weights: Mapping[str, torch.Tensor], out: Path, external: bool | None = None
) -> dict[str, Any]:
    """``graph_file`` (traced with the weights as inputs) + ``weights`` -> the ONNX model ``out``;
    returns what was written (initializers, folded transposes, bytes, external or not).
    ``external``: weights in ``model.onnx.data`` (None: only past protobuf's 2 GB limit)."""
    model = onnx.load(str(graph_file), load_external_data=False)
    graph = model.graph
    # Only the weights the graph takes as inputs: the exporter feeds a weight equal to another one
    # (its deduplication) through an Identity node named after it.
    inputs = {value.name for value in graph.input}
    plan = _fold_transposes(graph, {name: tensor for name, tensor in weights.items() if name in inputs})
    kept_inputs = [value for value in graph.input if value.name not in plan and value.name not in weights]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    shapes = {name: _shape(weights, *plan[name]) for name in plan}
    total_bytes = sum(nbytes for _, _, nbytes in shapes.values())
    external = total_bytes > _INLINE_LIMIT if external is None else external
    graph_bytes = graph.SerializeToString()
    model.ClearField("graph")
    head = model.SerializeToString()
    with open(out, "wb") as file:
        if external:
            with open(out.parent / EXTERNAL_DATA_FILE, "wb") as data:
                entries = [_external_entry(name, _array(weights, *plan[name]), data) for name in plan]
            file.write(head + _field_header(_MODEL_GRAPH, len(graph_bytes) + sum(map(len, entries))))
            file.write(graph_bytes)
            for entry in entries:
                file.write(entry)
        else:
            headers = {name: _inline_header(name, *shapes[name]) for name in plan}
            length = len(graph_bytes) + sum(len(headers[name]) + shapes[name][2] for name in plan)
            file.write(head + _field_header(_MODEL_GRAPH, length))
            file.write(graph_bytes)
            for name, (source, transposed) in plan.items():
                file.write(headers[name])
                file.write(_raw(_array(weights, source, transposed)))  # one tensor in memory at a time
    folded = sum(1 for _, transposed in plan.values() if transposed)
    return {
        "initializers": len(plan),
        "folded_transposes": folded,
        "bytes": total_bytes,
        "external": external,
    }
