"""Bench for quantization-aware training on the MiniLM tweets teacher (issue 9 targets), one run.

Two 3-layer students are distilled from the teacher with the same seed, data and steps: a float one,
and a QAT one (int8 fake-quantization, ``--qat``). The float student is exported and quantized
post-training (``trimformer quantize --calibration builtin:tweets``, preset cpu-vnni); the QAT one is
exported and quantized with the ranges it was trained with (``--ranges-from-training``).

Targets (docs/QAT.md):

* QAT + static int8 test accuracy >= the PTQ int8 student's, and within 0.5 points of the float student;
* its p50 latency at 1x128 equals the PTQ int8 student's (interleaved rounds in this run; within 5 %);
* parity: labels of the QAT int8 graph agree with the fake-quantized PyTorch student on >= 99.5 % of the
  test rows.

Usage: ``.venv/bin/python -m bench.qat [--teacher DIR --steps N --qat-steps N --limit ROWS --reuse]``
Writes ``bench/results/qat.json``; scratch goes to ``work/qat/bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import logits, open_session
from bench.distill import _accuracy, _distill, _export, _latency, _start, _test_batches

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results" / "qat.json"
LATENCY_TOLERANCE = 1.05


def _fake_quant_logits(student_dir: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The QAT student as trained: PyTorch with the fake-quantization and its final ranges."""
    import torch

    from trimformer.training.qat import load_fake_quant_student

    source = load_fake_quant_student(student_dir)
    out = []
    with torch.inference_mode():
        for b in batches:
            logits = source.module(*[torch.from_numpy(b[n]) for n in source.io.input_names])
            out.append((logits[0] if isinstance(logits, tuple | list) else logits).float().numpy())
    return np.concatenate(out)


def _quantize(model: Path, out: Path, training: bool, samples: int) -> dict[str, Any]:
    from trimformer.passes.quantize.int8 import QuantizeConfig
    from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_quantize

    started = time.perf_counter()
    summary = run_quantize(
        QuantizeStageConfig(
            model=str(model),
            out=str(out),
            quantize=QuantizeConfig(ranges_from_training=training, samples=samples),
            calibration=None if training else "builtin:tweets",
            overwrite=True,
        )
    )
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "size_mb": summary["size_mb"],
        "quantized": summary["quantized"],
        "quantizable": summary["quantizable"],
        "calibration": {k: v for k, v in (summary.get("calibration") or {}).items() if k != "nodes"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, default=Path("work/demo/teacher"))
    parser.add_argument("--work", type=Path, default=Path("work/qat/bench"))
    parser.add_argument("--layers", default="3")
    parser.add_argument("--steps", type=int, default=1500, help="Optimizer steps of each student.")
    parser.add_argument(
        "--qat-steps", type=int, default=0, help="Fake-quantize only the last N steps (0: all)."
    )
    parser.add_argument("--qat-ranges", choices=["ema", "learned"], default="ema")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-limit", type=int, default=1000, help="Dev rows per evaluation.")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="Training seconds per student [default: none]."
    )
    parser.add_argument("--samples", type=int, default=512, help="Calibration rows of the PTQ student.")
    parser.add_argument("--limit", type=int, default=None, help="Test rows [default: the whole test split].")
    parser.add_argument("--runs", type=int, default=300, help="Latency runs per model.")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads.")
    parser.add_argument("--train-threads", type=int, default=2, help="PyTorch threads for training.")
    parser.add_argument("--reuse", action="store_true", help="Reuse students already in --work.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from trimformer.data.tokenizer import load_tokenizer

    if not _start(args):
        return 2
    work = args.work
    report: dict[str, Any] = {
        "cores": os.cpu_count(),
        "threads": args.threads,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }

    runs: dict[str, dict[str, Any]] = {}
    students = {"float": work / "student", "qat": work / "student-qat"}
    for name, folder in students.items():
        extra = (
            {"qat": True, "qat_steps": args.qat_steps, "qat_ranges": args.qat_ranges} if name == "qat" else {}
        )
        if args.reuse and (folder / "trimformer_distill.json").is_file():
            runs[name] = json.loads((folder / "trimformer_distill.json").read_text())["result"]
        else:
            runs[name] = _distill(args.teacher, folder, args, layers=args.layers, **extra)
        _export(folder, work / f"{folder.name}-onnx")
    report["distill"] = runs
    report["quantize"] = {
        "ptq": _quantize(work / "student-onnx", work / "student-ptq-int8", False, args.samples),
        "qat": _quantize(work / "student-qat-onnx", work / "student-qat-int8", True, args.samples),
    }

    batches, y = _test_batches(args.teacher, max_length=128, limit=args.limit)
    variants = {
        "float student": work / "student-onnx",
        "PTQ int8 student": work / "student-ptq-int8",
        "QAT float graph": work / "student-qat-onnx",
        "QAT + static int8": work / "student-qat-int8",
    }
    accuracy = {name: _accuracy(path, batches, y, args.threads) for name, path in variants.items()}
    qat_int8 = logits(open_session(work / "student-qat-int8" / "model.onnx", args.threads), batches)
    fake = _fake_quant_logits(students["qat"], batches)
    accuracy["QAT fake-quant PyTorch"] = float((fake.argmax(-1) == y).mean())
    parity = {
        "label_agreement": round(float((qat_int8.argmax(-1) == fake.argmax(-1)).mean()), 5),
        "max_abs_logit_diff": float(np.abs(qat_int8 - fake).max()),
        "rows": len(y),
    }
    vocab = load_tokenizer(args.teacher).get_vocab_size()
    timed = {k: variants[k] for k in ("float student", "PTQ int8 student", "QAT + static int8")}
    latency = _latency(timed, args.threads, args.runs, vocab)
    ptq_acc, qat_acc, float_acc = (
        accuracy["PTQ int8 student"],
        accuracy["QAT + static int8"],
        accuracy["float student"],
    )
    latency_ratio = latency["QAT + static int8"]["p50"] / latency["PTQ int8 student"]["p50"]
    report.update(
        test_accuracy={k: round(v, 4) for k, v in accuracy.items()},
        parity_qat_int8_vs_fake_quant=parity,
        latency_ms_1x128=latency,
        qat_vs_ptq_latency_ratio=round(latency_ratio, 3),
        points_below_float=round(100 * (float_acc - qat_acc), 2),
        points_above_ptq=round(100 * (qat_acc - ptq_acc), 2),
    )
    targets = {
        "qat_int8_accuracy>=ptq_int8": qat_acc >= ptq_acc,
        "qat_int8_within_0.5_points_of_float": float_acc - qat_acc <= 0.005,
        f"qat_int8_p50<=ptq_int8_p50x{LATENCY_TOLERANCE}": latency_ratio <= LATENCY_TOLERANCE,
        "label_agreement_with_fake_quant>=0.995": parity["label_agreement"] >= 0.995,
    }
    report["targets"] = targets
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")

    print(f"{'variant (3-layer student)':<34} {'test acc':>9} {'p50 1x128 ms':>13}")
    for name in ("float student", "PTQ int8 student", "QAT fake-quant PyTorch", "QAT + static int8"):
        p50 = latency.get(name, {}).get("p50", float("nan"))
        label = "distilled with QAT + static int8" if name == "QAT + static int8" else name
        print(f"{label:<34} {accuracy[name]:>9.4f} {p50:>13.2f}")
    print(
        f"QAT int8 vs fake-quant PyTorch: label agreement {parity['label_agreement']:.4f}, "
        f"max |logit diff| {parity['max_abs_logit_diff']:.2e} over {parity['rows']} test rows"
    )
    for name, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"written to {args.results}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
