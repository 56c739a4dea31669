"""Baseline variants made with onnxruntime's own tools, each run as its own process.

``python -m bench.producers ort-dynamic|ort-best SRC_DIR OUT_DIR`` or
``python -m bench.producers ort-static SRC_DIR OUT_DIR CALIBRATION_JSONL``. The harness runs these in
subprocesses so that each variant's wall time and peak memory are its own.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np


class _JsonlReader:
    """onnxruntime's CalibrationDataReader protocol over pre-tokenized rows (batch 1)."""

    def __init__(self, path: Path, input_names: list[str]) -> None:
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.input_names = input_names
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.rows):
            return None
        row = self.rows[self.index]
        self.index += 1
        return {name: np.asarray([row[name]], dtype=np.int64) for name in self.input_names}

    def rewind(self) -> None:
        self.index = 0


def _prepare(src: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def ort_dynamic(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _prepare(src, out)
    quantize_dynamic(src / "model.onnx", out / "model.onnx", per_channel=True, weight_type=QuantType.QInt8)


def attention_dims(folder: Path) -> tuple[int, int]:
    """The head count and hidden size a user would give onnxruntime's optimizer (config.json)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return int(config["num_attention_heads"]), int(config["hidden_size"])


def write_ort_best(model: Path, dest: Path, scratch: Path) -> None:
    """onnxruntime's documented BERT path, the best dynamic int8 a user of onnxruntime alone gets:
    its transformers optimizer with the head count given, then ``quantize_dynamic`` per-channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from trimformer.passes.fuse.fusion import in_scratch_dir

    model, dest = model.resolve(), dest.resolve()  # the optimizer runs from a scratch folder
    heads, hidden = attention_dims(model.parent)
    optimized = scratch.resolve() / "ort_optimized.onnx"
    with in_scratch_dir():
        optimize_model(str(model), model_type="bert", num_heads=heads, hidden_size=hidden).save_model_to_file(
            str(optimized)
        )
    quantize_dynamic(str(optimized), str(dest), per_channel=True, weight_type=QuantType.QInt8)


def ort_best(src: Path, out: Path) -> None:
    _prepare(src, out)
    write_ort_best(src / "model.onnx", out / "model.onnx", out)
    (out / "ort_optimized.onnx").unlink()


def ort_static(src: Path, out: Path, calibration: Path) -> None:
    import onnx
    from onnxruntime.quantization import quantize_static

    _prepare(src, out)
    names = [i.name for i in onnx.load(str(src / "model.onnx"), load_external_data=False).graph.input]
    from trimformer.passes.fuse.fusion import in_scratch_dir

    src, out, calibration = src.resolve(), out.resolve(), calibration.resolve()
    # quantize_static as a user calls it: its defaults (QDQ, S8S8, per-tensor, MinMax); from a
    # scratch folder, because it writes augmented_model.onnx into the current directory.
    with in_scratch_dir():
        quantize_static(src / "model.onnx", out / "model.onnx", _JsonlReader(calibration, names))


def main(argv: list[str]) -> None:
    kind, src, out = argv[0], Path(argv[1]), Path(argv[2])
    if kind == "ort-dynamic":
        ort_dynamic(src, out)
    elif kind == "ort-best":
        ort_best(src, out)
    elif kind == "ort-static":
        ort_static(src, out, Path(argv[3]))
    else:
        raise SystemExit(f"unknown producer {kind}")


if __name__ == "__main__":
    main(sys.argv[1:])
