"""Streaming calibration with onnxruntime's calibrators, and the ranges cache.

onnxruntime's ``quantize_static`` hands the whole reader to ``collect_data``; its histogram
calibrators (entropy, percentile) then keep every batch's activations in memory before binning
them (onnxruntime#10503, #11020) and ``np.asarray`` a list of differently shaped batches
("inhomogeneous shape"). Here the calibrator is fed one batch per ``collect_data`` call: the
histograms (and min/max) are merged batch by batch, so memory stays flat in the number of samples
and batches may have any shape. The ranges are saved with onnxruntime's own cache format
(``save_tensors_data``), so ``quantize_static(calibration_cache_path=...)`` can read them too.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trimformer.errors import UserError
from trimformer.passes.base import CalibrationFeeds
from trimformer.runtime.session import cpu_session

__all__ = ["calibrate", "check_feeds", "infer_types", "load_ranges", "save_ranges"]

logger = logging.getLogger(__name__)


class _OneBatch:
    """A CalibrationDataReader that yields one given feed dict, then None."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self._feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self._feed = self._feed, None
        return feed


def infer_types(model: onnx.ModelProto, scratch: Path | None = None) -> onnx.ModelProto:
    """Types and shapes for every tensor, contrib ops included (onnxruntime's symbolic shape
    inference; the quantizer and calibrators skip tensors whose type they cannot see)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from trimformer.passes.fuse.fusion import in_scratch_dir

    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.value_info[:]
    try:
        with in_scratch_dir(scratch):
            inferred = SymbolicShapeInference.infer_shapes(stripped, auto_merge=True, guess_output_rank=True)
    except Exception as exc:
        logger.debug("symbolic shape inference failed (%s); using onnx shape inference", exc)
        inferred = None
    if inferred is None:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    return inferred


def check_feeds(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    """Refuse calibration feeds whose columns do not match the graph's inputs."""
    expected = [i.name for i in model.graph.input]
    if sorted(feed) != sorted(expected):
        raise UserError(
            f"calibration data has columns {', '.join(sorted(feed))} but the model takes "
            f"{', '.join(expected)}; pass data encoded for this model"
        )
    for value in model.graph.input:
        array = feed[value.name]
        elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        rank = len(value.type.tensor_type.shape.dim)
        if array.dtype != elem or array.ndim != rank:
            raise UserError(
                f"calibration column {value.name!r} is {array.dtype}[{array.ndim}d] but the model takes "
                f"{np.dtype(elem)}[{rank}d]; pass data encoded for this model"
            )


def calibrate(
    model: onnx.ModelProto,
    make_source: Callable[[], CalibrationFeeds],
    method: str,
    op_types: Sequence[str],
    samples: int,
    scratch: Path,
    percentile: float = 99.999,
    symmetric: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Any, int]:
    """Run the calibrator over the feeds, one batch at a time; returns (TensorsData, rows seen).

    ``samples`` is the number of rows asked for; fewer rows in the source is an error.
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    source = make_source()
    first = source.get_next()
    if first is None:
        raise UserError("the calibration data is empty; pass a dataset with at least one row")
    check_feeds(model, first)
    cal_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    extra: dict[str, Any] = {"symmetric": symmetric}
    if method == "percentile":
        extra["percentile"] = percentile
    model_path = scratch / "calibrate_input.onnx"
    onnx.save_model(model, model_path)
    calibrator = create_calibrator(
        model_path,
        list(op_types),
        augmented_model_path=str(scratch / "calibrate_augmented.onnx"),
        calibrate_method=cal_method,
        extra_options=extra,
    )
    _quiet_session(calibrator)
    rows = 0
    feed: dict[str, np.ndarray] | None = first
    while feed is not None:
        # The histogram calibrators print a line per call; keep stdout for the CLI's result.
        with contextlib.redirect_stdout(io.StringIO()):
            calibrator.collect_data(_OneBatch(feed))
        rows += int(next(iter(feed.values())).shape[0])
        if on_batch is not None:
            on_batch(rows)
        # ``samples`` rows are enough; a larger source is not read to its end.
        feed = source.get_next() if rows < samples else None
    if rows < samples:
        raise UserError(
            f"the calibration data has {rows} rows but {samples} were asked for; pass more data or --samples {rows}"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        ranges = calibrator.compute_data()
    del calibrator
    for path in scratch.glob("calibrate_*"):
        path.unlink(missing_ok=True)
    return ranges, rows


def _quiet_session(calibrator: Any) -> None:
    """Recreate the calibrator's session without thread spinning: on a shared machine spinning
    workers fight for the cores (measured: calibration 2-3x slower under load)."""
    calibrator.infer_session = cpu_session(
        Path(calibrator.augmented_model_path), optimization="disabled", spinning=False
    )


def save_ranges(ranges: Any, path: Path) -> None:
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(ranges, path)


def load_ranges(path: Path) -> Any:
    from onnxruntime.quantization.calibrate import load_tensors_data

    try:
        return load_tensors_data(path)
    except Exception as exc:
        raise UserError(
            f"calibration cache {path} is unreadable ({type(exc).__name__}); delete it to recalibrate"
        ) from exc
