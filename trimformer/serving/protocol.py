"""The Open Inference Protocol's infer messages (KServe v2 / Triton), JSON and binary tensors.

A request is JSON, or (Triton's binary tensor extension, what ``tritonclient`` sends by default)
JSON of ``Inference-Header-Content-Length`` bytes followed by each binary input's bytes in order.
Numbers are little-endian; a ``BYTES`` element is a 4-byte little-endian length and its bytes. A
response puts an output in binary when the request asks (``binary_data`` on the output, or
``binary_data_output`` on the request); otherwise its values go in ``data``, flattened row-major.

Every malformed message is an :class:`~trimformer.serving.errors.HTTPProblem` 400 with one line.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trimformer.serving.errors import HTTPProblem

__all__ = [
    "DATATYPES",
    "InferRequest",
    "Output",
    "bytes_array",
    "datatype_of",
    "encode_response",
    "parse_request",
]

DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def bytes_array(items: list[bytes]) -> np.ndarray:
    """A 1-D object array of ``bytes`` (numpy would make equal-length items a 2-D char array)."""
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array


def datatype_of(dtype: Any) -> str:
    """The protocol's name for a numpy dtype (``BYTES`` for strings and objects)."""
    kind = np.dtype(dtype)
    if kind.kind in "OUS":
        return "BYTES"
    for name, numpy_type in DATATYPES.items():
        if name != "BYTES" and np.dtype(numpy_type) == kind:
            return name
    raise ValueError(f"no protocol datatype for {kind}")


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    # Output name -> binary or not; empty: every output, binary when ``binary_default``.
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False


@dataclass(frozen=True)
class Output:
    name: str
    array: np.ndarray

    @property
    def datatype(self) -> str:
        return datatype_of(self.array.dtype)


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, rest = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise HTTPProblem(400, f"Inference-Header-Content-Length {header_length!r} does not fit the body")
        head, rest = body[: int(header_length)], body[int(header_length) :]
    try:
        message = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise HTTPProblem(400, f"the inference request is not valid JSON ({exc})") from None
    if not isinstance(message, dict):
        raise HTTPProblem(400, "the inference request must be a JSON object")
    return message, rest


def _bytes_elements(raw: bytes, count: int, name: str) -> np.ndarray:
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise HTTPProblem(400, f"input {name}: binary BYTES data ends early")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise HTTPProblem(400, f"input {name}: binary BYTES data ends early")
        out.append(raw[offset : offset + size])
        offset += size
    if offset != len(raw):
        raise HTTPProblem(400, f"input {name}: binary data has {len(raw) - offset} bytes more than its shape")
    return bytes_array(out)


def _tensor(spec: Any, rest: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One input of the request (and how far into the binary section it reached)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise HTTPProblem(400, "each input needs a name, a shape, a datatype and data")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    if datatype not in DATATYPES:
        raise HTTPProblem(400, f"input {name}: unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HTTPProblem(400, f"input {name}: shape must be a list of non-negative integers")
    count = int(np.prod(shape)) if shape else 1
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise HTTPProblem(400, f"input {name}: binary_data_size {size!r} does not fit the body")
        raw = rest[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            array = _bytes_elements(raw, count, name)
        else:
            itemsize = np.dtype(DATATYPES[datatype]).itemsize
            if len(raw) != count * itemsize:
                raise HTTPProblem(400, f"input {name}: {len(raw)} bytes of binary data for shape {shape}")
            array = np.frombuffer(raw, dtype=np.dtype(DATATYPES[datatype]).newbyteorder("<"))
    else:
        data = spec.get("data")
        if data is None:
            raise HTTPProblem(400, f"input {name}: no data (neither 'data' nor binary_data_size)")
        try:
            array = np.asarray(data, dtype=DATATYPES[datatype]).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise HTTPProblem(400, f"input {name}: data does not hold {datatype} values") from None
        if array.size != count:
            raise HTTPProblem(400, f"input {name}: {array.size} values for shape {shape}")
    return name, array.reshape(shape), offset


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    message, rest = _split(body, header_length)
    specs = message.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise HTTPProblem(400, "the inference request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        name, array, offset = _tensor(spec, rest, offset)
        if name in inputs:
            raise HTTPProblem(400, f"input {name} is given twice")
        inputs[name] = array
    if offset != len(rest):
        raise HTTPProblem(400, f"{len(rest) - offset} bytes of binary data belong to no input")
    parameters = message.get("parameters") or {}
    binary_default = (
        bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    )
    outputs: dict[str, bool] = {}
    for spec in message.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise HTTPProblem(400, "each requested output needs a name")
        outputs[spec["name"]] = bool((spec.get("parameters") or {}).get("binary_data", binary_default))
    request_id = message.get("id")
    return InferRequest(None if request_id is None else str(request_id), inputs, outputs, binary_default)


def _binary(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OUS":
        parts = []
        for item in array.reshape(-1):
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _json_values(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if array.dtype.kind in "OUS":
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in flat]
    return flat.tolist()


def encode_response(
    model: str, version: str, request: InferRequest, outputs: list[Output]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when some output is binary."""
    entries, blobs = [], []
    for output in outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.array.shape),
        }
        if request.outputs.get(output.name, request.binary_default):
            blob = _binary(output.array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(output.array)
        entries.append(entry)
    message: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        message["id"] = request.id
    head = json.dumps(message).encode("utf-8")
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
