"""Microsoft Olive variant, run with the olive venv's python.

    python olive_run.py TEACHER_DIR CALIBRATION_TEXTS_JSONL OUT_DIR

The workflow a user would write for this job: OnnxConversion (opset 17) -> OrtTransformersOptimization
(bert) -> OnnxStaticQuantization (Olive's defaults) calibrated on the same 512 tweets, padded to 128.
Writes OUT_DIR/model.onnx and OUT_DIR/notes.txt.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> None:
    from olive import run

    teacher, texts, out = Path(argv[0]).resolve(), Path(argv[1]).resolve(), Path(argv[2]).resolve()
    work = Path(tempfile.mkdtemp(prefix="olive-"))
    config = {
        "input_model": {"type": "HfModel", "model_path": str(teacher), "task": "text-classification"},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "data_configs": [
            {
                "name": "calib",
                "type": "HuggingfaceContainer",
                "load_dataset_config": {"data_name": "json", "data_files": str(texts), "split": "train"},
                "pre_process_data_config": {
                    "input_cols": ["text"],
                    "label_col": "label",
                    "max_samples": 512,
                    "padding": "max_length",
                    "max_length": 128,
                },
                "dataloader_config": {"batch_size": 1},
            }
        ],
        "passes": {
            "conversion": {"type": "OnnxConversion", "target_opset": 17},
            "optimization": {"type": "OrtTransformersOptimization", "model_type": "bert"},
            "quantization": {"type": "OnnxStaticQuantization", "data_config": "calib"},
        },
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(work / "cache"),
        "output_dir": str(work / "out"),
    }
    run(config)
    produced = sorted((work / "out").rglob("*.onnx"), key=lambda p: p.stat().st_mtime)
    if not produced:
        raise SystemExit("olive produced no ONNX model")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(produced[-1], out / "model.onnx")
    data = produced[-1].with_suffix(".onnx.data")
    if data.exists():
        shutil.copy2(data, out / data.name)
    (out / "notes.txt").write_text(
        "olive: OnnxConversion + OrtTransformersOptimization(bert) + OnnxStaticQuantization\n"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
