"""Hugging Face Optimum variants, run with the optimum venv's python (transformers<4.58).

    python optimum_run.py o2-static TEACHER_DIR CALIBRATION_JSONL OUT_DIR
    python optimum_run.py dynamic   TEACHER_DIR CALIBRATION_JSONL OUT_DIR

Follows Optimum's documented flow: export, ORTOptimizer O2, ORTQuantizer with the avx512_vnni preset,
MinMax calibration on the same samples trimformer calibrates on. Writes OUT_DIR/model.onnx and
OUT_DIR/notes.txt (what was done, and any fallback).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path


def _export(teacher: Path, work: Path):  # type: ignore[no-untyped-def]
    from optimum.onnxruntime import ORTModelForSequenceClassification

    model = ORTModelForSequenceClassification.from_pretrained(str(teacher), export=True)
    model.save_pretrained(str(work / "export"))
    return model


def _calibration_dataset(path: Path):  # type: ignore[no-untyped-def]
    from datasets import Dataset

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    return Dataset.from_dict(columns)


def o2_static(teacher: Path, calibration: Path, out: Path, notes: list[str]) -> Path:
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import (
        AutoCalibrationConfig,
        AutoQuantizationConfig,
        OptimizationConfig,
    )

    work = Path(tempfile.mkdtemp())
    model = _export(teacher, work)
    optimizer = ORTOptimizer.from_pretrained(model)
    optimizer.optimize(
        save_dir=str(work / "o2"), optimization_config=OptimizationConfig(optimization_level=2)
    )
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=True, per_channel=False)
    dataset = _calibration_dataset(calibration)
    calib = AutoCalibrationConfig.minmax(dataset)
    for source, file_name in ((work / "o2", "model_optimized.onnx"), (work / "export", "model.onnx")):
        try:
            quantizer = ORTQuantizer.from_pretrained(str(source), file_name=file_name)
            ranges = quantizer.fit(
                dataset=dataset, calibration_config=calib, operators_to_quantize=qconfig.operators_to_quantize
            )
            quantizer.quantize(
                save_dir=str(work / "q"), calibration_tensors_range=ranges, quantization_config=qconfig
            )
            notes.append(f"static avx512_vnni MinMax on {file_name}")
            break
        except Exception as exc:  # Optimum's own guide falls back to the unoptimized export
            notes.append(f"static quantization of {file_name} failed: {str(exc).splitlines()[0][:200]}")
    else:
        raise SystemExit("optimum static quantization failed on both graphs")
    produced = sorted((work / "q").glob("*.onnx"))[0]
    return produced


def dynamic(teacher: Path, out: Path, notes: list[str]) -> Path:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    work = Path(tempfile.mkdtemp())
    _export(teacher, work)
    quantizer = ORTQuantizer.from_pretrained(str(work / "export"), file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    quantizer.quantize(save_dir=str(work / "q"), quantization_config=qconfig)
    notes.append("dynamic avx512_vnni per-channel on the export")
    return sorted((work / "q").glob("*.onnx"))[0]


def main(argv: list[str]) -> None:
    kind, teacher, calibration, out = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    notes: list[str] = []
    produced = (
        o2_static(teacher, calibration, out, notes) if kind == "o2-static" else dynamic(teacher, out, notes)
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(produced, out / "model.onnx")
    (out / "notes.txt").write_text("\n".join(notes) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
