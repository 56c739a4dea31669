"""Where an int8 graph spends its time: onnxruntime's profiler, per operator type, several models
side by side at 1x128 (2 threads), so that a CPU class's deciding kernels can be read off.

Usage: ``.venv/bin/python -m bench.profile NAME=MODEL.onnx [NAME=MODEL.onnx ...] [--runs 100]``
(for instance ``static=work/teacher-int8/model.onnx ort-best=work/quantize/ort/ort_best.onnx``).
Prints milliseconds per inference by operator type (median over the runs of each model's total,
its per-type split from the sum over all runs) and writes ``bench/results/profile.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

RESULTS = Path(__file__).parent / "results" / "profile.json"
THREADS = 2
WARMUP = 10


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    values = {
        "input_ids": rng.integers(1000, 20000, size=(1, 128), dtype=np.int64),
        "attention_mask": np.ones((1, 128), dtype=np.int64),
        "token_type_ids": np.zeros((1, 128), dtype=np.int64),
    }
    return {i.name: values[i.name] for i in session.get_inputs()}


def profile(model: Path, runs: int, folder: Path) -> dict[str, Any]:
    """Per operator type, microseconds per inference over ``runs`` profiled calls after warm-up."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / model.stem)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feeds = _feeds(session)
    for _ in range(WARMUP):
        session.run(None, feeds)
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    by_op: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    totals = []
    warm = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    cutoff = sorted(e["ts"] for e in warm)[WARMUP] if len(warm) > WARMUP else 0
    for event in events:
        if event.get("ts", 0) < cutoff:
            continue
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            totals.append(event["dur"])
        elif event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] += event["dur"]
            counts[op] += 1
    n = max(len(totals), 1)
    return {
        "median_total_ms": float(np.median(totals)) / 1000 if totals else None,
        "ms_by_op": {op: round(us / n / 1000, 3) for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "nodes_by_op": {op: counts[op] // n for op in by_op},
        "runs": len(totals),
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+", help="NAME=path/to/model.onnx")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    named = dict(spec.split("=", 1) for spec in args.models)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: profile(Path(path), args.runs, Path(tmp)) for name, path in named.items()}
    ops = sorted(
        {op for r in results.values() for op in r["ms_by_op"]},
        key=lambda op: -max(r["ms_by_op"].get(op, 0.0) for r in results.values()),
    )
    print(f"{'op (ms per inference, 1x128)':<34}" + "".join(f"{name:>14}" for name in results))
    for op in ops:
        cells = [results[name]["ms_by_op"].get(op) for name in results]
        print(f"{op:<34}" + "".join(f"{'-' if c is None else f'{c:.3f}':>14}" for c in cells))
    print(f"{'median total':<34}" + "".join(f"{r['median_total_ms']:>14.3f}" for r in results.values()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"cpu": _cpu_name(), "threads": THREADS, "models": named, **results}
    RESULTS.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
