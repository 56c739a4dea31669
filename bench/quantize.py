"""Bench for the quantize pass (issue 3): trimformer static int8 beside onnxruntime's own
dynamic and static int8, all built and measured in this one run on the MiniLM tweets teacher.

Rows: FP32; ORT ``quantize_dynamic`` per-channel (out of the box, on the export); ORT's best dynamic
path (``ort-best``: its transformers optimizer with the head count given, then ``quantize_dynamic``
per-channel); ORT
``quantize_static`` defaults (QDQ S8S8, MinMax, 512 samples, after ``quant_pre_process``);
trimformer ``--dynamic``; trimformer static (cpu-vnni, qoperator and qdq); trimformer
accuracy-aware (0.5 points). Latency: batch 1 padded to 128 tokens, 2 threads, interleaved rounds,
p50 of at least 200 runs per variant after warm-up. Agreement and accuracy: the test split. The
calibration memory check runs the pass in fresh processes with 256 and 4096 samples.

    .venv/bin/python -m bench.quantize [--model work/demo/teacher-onnx] [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import open_session, predicted_labels, time_sessions
from bench.producers import write_ort_best
from trimformer.validation.latency import InterleavedLatency

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "work" / "quantize" / "bench"
THREADS = 2
CASE = "1x128"

TARGETS = {
    "latency_vs_ort_dynamic": 0.80,
    "agreement": 0.985,
    "accuracy_drop_points": 0.5,
    "size_mb": 25.0,
    "pass_seconds": 30.0,
    "rss_ratio_4096_vs_256": 1.25,
}


def _ort_baselines(model: Path, out: Path, feeds_factory: Any) -> dict[str, float]:
    """onnxruntime's dynamic and static int8 as a user would run them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from trimformer.passes.fuse.fusion import in_scratch_dir

    seconds = {}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    quantize_dynamic(str(model), str(out / "ort_dynamic.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    seconds["ort-dynamic"] = time.perf_counter() - t0
    # onnxruntime's documented BERT path: its transformers optimizer with the head count given,
    # then quantize_dynamic per-channel (the best dynamic path a user of onnxruntime alone gets).
    t0 = time.perf_counter()
    write_ort_best(model, out / "ort_best.onnx", out)
    seconds["ort-best"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with in_scratch_dir():
        quant_pre_process(str(model), str(out / "pre.onnx"), skip_symbolic_shape=True)
        quantize_static(str(out / "pre.onnx"), str(out / "ort_static.onnx"), feeds_factory())
    seconds["ort-static"] = time.perf_counter() - t0
    return seconds


def _run_pass(model: Path, out: Path, **kwargs: Any) -> tuple[Path, dict[str, Any], float]:
    from trimformer.passes.quantize.int8 import QuantizeConfig
    from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_quantize

    stage_keys = {"calibration", "eval", "batch_size", "pad_to", "eval_limit"}
    stage = {k: kwargs.pop(k) for k in list(kwargs) if k in stage_keys}
    t0 = time.perf_counter()
    summary = run_quantize(
        QuantizeStageConfig(
            model=str(model), out=str(out), quantize=QuantizeConfig(**kwargs), overwrite=True, **stage
        )
    )
    return out / "model.onnx", summary, time.perf_counter() - t0


def _rss_child(model: str, samples: int, out: str) -> None:
    """Runs in a fresh process: the quantize pass, then prints the process's peak RSS."""
    from trimformer.passes.quantize.int8 import QuantizeConfig
    from trimformer.pipeline.stages.quantize import QuantizeStageConfig, run_quantize
    from trimformer.validation.latency import PeakMemory

    # psutil sampling, not ru_maxrss: Linux keeps the parent's high-water mark across fork + exec.
    with PeakMemory(interval=0.005) as mem:
        run_quantize(
            QuantizeStageConfig(
                model=model,
                out=out,
                quantize=QuantizeConfig(samples=samples),
                calibration="builtin:tweets",
                overwrite=True,
            )
        )
    print(json.dumps({"samples": samples, "peak_rss_mb": mem.peak / 2**20, "rise_mb": mem.peak_mb}))


def _rss(model: Path) -> dict[str, Any]:
    rows = {}
    for samples in (256, 4096):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                sys.executable,
                "-m",
                "bench.quantize",
                "--rss-child",
                str(samples),
                "--model",
                str(model),
                "--rss-out",
                str(Path(tmp) / "q"),
            ]
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            rows[samples] = json.loads(res.stdout.strip().splitlines()[-1])
    return {
        "256": rows[256],
        "4096": rows[4096],
        "ratio": round(rows[4096]["peak_rss_mb"] / rows[256]["peak_rss_mb"], 3),
    }


def _latency(
    sessions: dict[str, Any], feed: dict[str, np.ndarray], runs: int, rounds: int
) -> InterleavedLatency:
    """``rounds`` interleaved rounds of ``runs // rounds`` calls per variant, after 20 warm-up calls."""
    per_round = max(1, runs // max(1, rounds))
    return time_sessions(sessions, feed, case=CASE, rounds=rounds, calls_per_round=per_round, warmup=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "work" / "demo" / "teacher-onnx"))
    parser.add_argument("--rows", type=int, default=2000, help="test rows for agreement and accuracy")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per variant")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument(
        "--only", default=None, help="comma-separated trimformer variants to build (default: all)"
    )
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.rss_child is not None:
        _rss_child(args.model, args.rss_child, args.rss_out)
        return

    from trimformer.artifact import ModelArtifact
    from trimformer.data import Encoder, load_dataset, map_labels
    from trimformer.data.calibration import DatasetFeeds
    from trimformer.data.tokenizer import load_tokenizer

    model_dir = Path(args.model).resolve()
    art = ModelArtifact.open(model_dir)
    names = [i.name for i in art.meta.inputs]
    enc = Encoder(
        load_tokenizer(model_dir), names, art.meta.tokenizer.max_length, art.meta.tokenizer.pad_token_id
    )
    calib = load_dataset("builtin:tweets", split="train", limit=512)
    test = load_dataset("builtin:tweets", split="test").head(args.rows)
    WORK.mkdir(parents=True, exist_ok=True)

    paths: dict[str, Path] = {"fp32": art.model_path}
    info: dict[str, dict[str, Any]] = {"fp32": {}}
    secs = _ort_baselines(art.model_path, WORK / "ort", lambda: DatasetFeeds(calib, enc, names, 512, 16, 128))
    paths["ort-dynamic"] = WORK / "ort" / "ort_dynamic.onnx"
    paths["ort-static"] = WORK / "ort" / "ort_static.onnx"
    paths["ort-best"] = WORK / "ort" / "ort_best.onnx"
    info["ort-best"] = {"pass_seconds": secs["ort-best"]}
    info["ort-dynamic"] = {"pass_seconds": secs["ort-dynamic"]}
    info["ort-static"] = {"pass_seconds": secs["ort-static"]}
    common = {"calibration": "builtin:tweets", "samples": 512}
    variants = {
        "trimformer-dynamic": {"dynamic": True},
        "trimformer-static": {**common},
        "trimformer-static-qdq": {**common, "format": "qdq"},
        "trimformer-static-entropy": {**common, "method": "entropy"},
        "trimformer-static-percentile": {**common, "method": "percentile"},
        "trimformer-static-aware-0.5": {
            **common,
            "eval": "builtin:tweets",
            "max_accuracy_drop": 0.5,
            "eval_limit": 1000,
        },
    }
    from trimformer.errors import TrimformerError

    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}

    skipped = {}
    for name, kwargs in variants.items():
        try:
            path, summary, seconds = _run_pass(model_dir, WORK / name, **kwargs)
        except TrimformerError as exc:
            skipped[name] = str(exc)
            print(f"{name}: {exc}")
            continue
        paths[name] = path
        info[name] = {
            "pass_seconds": seconds,
            "float_nodes": len(summary["float_nodes"]),
            "calibration_seconds": (summary.get("calibration") or {}).get("seconds"),
        }
    sessions = {k: open_session(p, THREADS) for k, p in paths.items()}
    batches = []
    for start in range(0, len(test), 64):
        batches.append(enc(test.texts[start : start + 64], None))
    try:
        targets = map_labels(test.labels, art.labels) if test.labels is not None and art.labels else None
    except TrimformerError:
        targets = None
    preds = {k: predicted_labels(s, batches) for k, s in sessions.items()}
    feed = enc(calib.texts[:1], None, pad_to=128)
    times = _latency(sessions, feed, args.runs, args.rounds)
    lat = {k: {**stats.to_dict(), "runs": stats.runs} for k, stats in times.stats(CASE).items()}
    vs_fp32, vs_ort_dynamic = times.ratios(CASE, "fp32"), times.ratios(CASE, "ort-dynamic")
    vs_ort_best = times.ratios(CASE, "ort-best")
    rows = []
    for key in paths:
        acc = float((preds[key] == targets).mean()) if targets is not None else None
        info.setdefault(key, {})
        rows.append(
            {
                "variant": key,
                "p50_ms": lat[key]["p50"],
                "vs_fp32": round(vs_fp32[key], 3),
                "vs_ort_dynamic": round(vs_ort_dynamic[key], 3),
                "vs_ort_best": round(vs_ort_best[key], 3),
                "agreement": round(float((preds[key] == preds["fp32"]).mean()), 4),
                "accuracy": None if acc is None else round(acc, 4),
                "size_mb": round(paths[key].stat().st_size / 1e6, 2),
                **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in info[key].items()},
                "latency": lat[key],
            }
        )
    fp32_acc = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_drop_points"] = (
            None
            if fp32_acc is None or row["accuracy"] is None
            else round((fp32_acc - row["accuracy"]) * 100, 2)
        )
    rss = None if args.skip_rss else _rss(model_dir)
    result = {
        "model": str(model_dir),
        "threads": THREADS,
        "shape": [1, 128],
        "test_rows": len(test),
        "targets": TARGETS,
        "rows": rows,
        "skipped": skipped,
        "calibration_rss": rss,
        "cpu_load_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    main_row = next(r for r in rows if r["variant"] == "trimformer-static")
    result["checks"] = {
        "latency_vs_ort_dynamic": main_row["vs_ort_dynamic"] <= TARGETS["latency_vs_ort_dynamic"],
        "latency_vs_ort_best": main_row["vs_ort_best"] <= TARGETS["latency_vs_ort_dynamic"],
        "agreement": main_row["agreement"] >= TARGETS["agreement"],
        "accuracy_drop": main_row["accuracy_drop_points"] is not None
        and main_row["accuracy_drop_points"] <= 0.5,
        "size": main_row["size_mb"] <= TARGETS["size_mb"],
        "pass_seconds": main_row["pass_seconds"] <= TARGETS["pass_seconds"],
        "rss": None if rss is None else rss["ratio"] <= TARGETS["rss_ratio_4096_vs_256"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantize.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    head = f"{'variant':30s} {'p50 ms':>7s} {'vs fp32':>7s} {'vs ortdyn':>9s} {'vs best':>7s} {'agree':>6s} {'acc':>6s} {'drop':>5s} {'MB':>6s} {'pass s':>6s}"
    print(head)
    for r in rows:
        print(
            f"{r['variant']:30s} {r['p50_ms']:7.2f} {r['vs_fp32']:7.3f} {r['vs_ort_dynamic']:9.3f} "
            f"{r['vs_ort_best']:7.3f} "
            f"{r['agreement']:6.3f} "
            f"{(r['accuracy'] or 0):6.3f} {(r['accuracy_drop_points'] or 0):5.2f} {r['size_mb']:6.1f} {r.get('pass_seconds', 0):6.1f}"
        )
    if rss:
        print(
            f"calibration peak RSS: 256 samples {rss['256']['peak_rss_mb']:.0f} MB, 4096 samples "
            f"{rss['4096']['peak_rss_mb']:.0f} MB (ratio {rss['ratio']})"
        )
    print("checks (trimformer-static):", result["checks"], f"load {result['cpu_load_1min']:.1f}")


if __name__ == "__main__":
    main()
