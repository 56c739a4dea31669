"""Run a model with some of its intermediate values as outputs.

Importance scores, reconstruction, sensitivity and SmoothQuant all read what flows into a
projection; onnxruntime returns only graph outputs, so the values are made outputs of a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from trimformer.passes.base import CalibrationFeeds, iter_feeds
from trimformer.runtime.session import cpu_session

__all__ = ["iter_outputs", "session_with_outputs", "with_outputs"]


def _needed_part(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Only the nodes and initializers that the named values depend on, with those as outputs."""
    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return with_outputs(model, names)  # subgraphs may read outer values; keep everything
    needed = set(names)
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    part = onnx.ModelProto()
    part.ir_version = model.ir_version
    part.opset_import.extend(model.opset_import)
    part.graph.name = graph.name
    part.graph.input.extend(graph.input)
    part.graph.node.extend(reversed(keep))
    part.graph.initializer.extend(i for i in graph.initializer if i.name in needed)
    part.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return part


def with_outputs(model: onnx.ModelProto, names: list[str], only: bool = False) -> onnx.ModelProto:
    """A copy of the model that also outputs the named values; ``only``: just those values,
    with only the part of the graph they need."""
    if only:
        return _needed_part(model, names)
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            existing.add(name)
    return proto


def session_with_outputs(
    model: onnx.ModelProto, names: list[str], threads: int | None = None, only: bool = False
) -> ort.InferenceSession:
    """A CPU session over :func:`with_outputs` of the model."""
    return cpu_session(with_outputs(model, names, only), threads=threads)


def iter_outputs(
    session: ort.InferenceSession, names: list[str], calibration: Callable[[], CalibrationFeeds]
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(feed, {name: value}) for each calibration batch, each fed the inputs the session takes."""
    inputs = [i.name for i in session.get_inputs()]
    for feeds in iter_feeds(calibration()):
        values = session.run(names, {n: feeds[n] for n in inputs if n in feeds})
        yield feeds, dict(zip(names, values, strict=True))
