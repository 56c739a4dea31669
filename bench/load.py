"""Load test of the runtime: one Predictor, many threads, many requests.

Targets (issue 8): driven from 8 threads with 10,000 requests, ``Predictor`` gives the same
outputs as single-threaded calls, and its resident memory grows by at most 5% after warm-up.

Run:  .venv/bin/python -m bench.load --bundle DIR   (DIR: a folder or .tar.gz from `trimformer package`)

Procedure: texts from builtin:tweets (test split; synthetic sentences when the examples extra is
missing), one to four texts per request. (1) every request once, sequentially: the reference
outputs; (2) a threaded warm-up over the first requests; (3) memory baseline (after gc); (4) all
requests from N threads while a sampler records resident memory every 20 ms; (5) final memory.
Outputs land in arrays allocated before the baseline, so the measurement sees the runtime only.
Writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

from trimformer.runtime import Predictor
from trimformer.validation.latency import PeakMemory

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "load.json"
SIZES = (1, 1, 1, 2, 1, 4, 1, 1, 3, 1)  # texts per request, cycled: mostly single texts, some micro-batches
MAX_GROWTH_PCT = 5.0


def _texts(limit: int) -> tuple[list[str], str]:
    try:
        from trimformer.data import load_dataset

        data = load_dataset("builtin:tweets", split="test", limit=limit)
        return list(data.texts), "builtin:tweets (test split)"
    except Exception as exc:  # the examples extra is optional
        logger.warning("builtin:tweets unavailable (%s); using synthetic sentences", exc)
        rng = np.random.default_rng(0)
        words = ["the", "a", "phone", "store", "great", "awful", "service", "today", "love", "hate", "slow"]
        texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for _ in range(limit)]
        return texts, "synthetic"


def _requests(texts: list[str], count: int) -> list[list[str]]:
    out = []
    cursor = 0
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        out.append([texts[(cursor + k) % len(texts)] for k in range(size)])
        cursor += size
    return out


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000.0
    return {q: round(float(np.percentile(arr, int(q[1:]))), 3) for q in ("p50", "p90", "p99")}


def run(bundle: str, threads: int, count: int, warmup: int, ort_threads: int, out: Path) -> dict[str, Any]:
    predictor = Predictor(bundle, threads=ort_threads)
    texts, source = _texts(limit=max(2000, min(count, 20000)))
    requests = _requests(texts, count)
    offsets = np.cumsum([0] + [len(r) for r in requests])
    width = predictor.run(requests[0]).shape[-1]
    reference = np.empty((int(offsets[-1]), width), dtype=np.float32)
    threaded = np.empty_like(reference)
    threaded.fill(np.nan)  # touch every page now, so filling it later is not counted as growth

    def call(index: int, into: np.ndarray, times: list[float]) -> None:
        started = time.perf_counter()
        result = predictor.run(requests[index])
        times[index] = time.perf_counter() - started
        into[offsets[index] : offsets[index + 1]] = result

    single_times = [0.0] * count
    started = time.perf_counter()
    for i in range(count):
        call(i, reference, single_times)
    single_seconds = time.perf_counter() - started
    print(f"single-threaded: {count} requests in {single_seconds:.1f} s", file=sys.stderr)

    warm_times = [0.0] * count
    with ThreadPoolExecutor(max_workers=threads) as pool:
        # Warm-up writes into `threaded`, which the measured pass overwrites in full.
        list(pool.map(lambda i: call(i, threaded, warm_times), range(min(warmup, count))))
    gc.collect()
    baseline = _rss()

    threaded_times = [0.0] * count
    with PeakMemory(interval=0.02) as sampler, ThreadPoolExecutor(max_workers=threads) as pool:
        started = time.perf_counter()
        list(pool.map(lambda i: call(i, threaded, threaded_times), range(count)))
        threaded_seconds = time.perf_counter() - started
    gc.collect()
    final = _rss()
    print(f"{threads} threads: {count} requests in {threaded_seconds:.1f} s", file=sys.stderr)

    diff = np.abs(threaded.astype(np.float64) - reference.astype(np.float64))
    same_rows = float(np.mean(np.all(threaded == reference, axis=-1)))
    agreement = None
    if predictor.task == "sequence-classification":
        agreement = float(np.mean(threaded.argmax(-1) == reference.argmax(-1)))
    growth = (final - baseline) / baseline * 100.0
    peak_growth = (sampler.peak - baseline) / baseline * 100.0
    result: dict[str, Any] = {
        "bundle": str(bundle),
        "digest": predictor.digest,
        "task": predictor.task,
        "texts": source,
        "requests": count,
        "texts_total": int(offsets[-1]),
        "threads": threads,
        "ort_intra_op_threads": ort_threads,
        "warmup_requests": min(warmup, count),
        "single": {
            "seconds": round(single_seconds, 2),
            "requests_per_s": round(count / single_seconds, 1),
            "latency_ms": _percentiles(single_times),
        },
        "threaded": {
            "seconds": round(threaded_seconds, 2),
            "requests_per_s": round(count / threaded_seconds, 1),
            "latency_ms": _percentiles(threaded_times),
        },
        "outputs": {
            "identical_row_fraction": round(same_rows, 6),
            "max_abs_diff": float(diff.max(initial=0.0)),
            "label_agreement": agreement,
        },
        "memory": {
            "baseline_mb": round(baseline / 1e6, 1),
            "final_mb": round(final / 1e6, 1),
            "peak_mb": round(sampler.peak / 1e6, 1),
            "growth_pct": round(growth, 2),
            "peak_growth_pct": round(peak_growth, 2),
        },
        "targets": {
            "same_outputs": bool(diff.max(initial=0.0) <= 1e-5 and (agreement in (None, 1.0))),
            "rss_growth_le_5pct": bool(growth <= MAX_GROWTH_PCT),
        },
        "env": {
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
            "cpus": psutil.cpu_count(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _print(result: dict[str, Any], out: Path) -> None:
    o, m, s, t = result["outputs"], result["memory"], result["single"], result["threaded"]
    rows = [
        ("requests (texts)", f"{result['requests']} ({result['texts_total']})"),
        ("single-threaded", f"{s['requests_per_s']} req/s, p50 {s['latency_ms']['p50']} ms"),
        (f"{result['threads']} threads", f"{t['requests_per_s']} req/s, p50 {t['latency_ms']['p50']} ms"),
        (
            "outputs identical (rows)",
            f"{o['identical_row_fraction']:.4f}, max abs diff {o['max_abs_diff']:.2e}",
        ),
        ("label agreement", "n/a" if o["label_agreement"] is None else f"{o['label_agreement']:.4f}"),
        ("RSS after warm-up", f"{m['baseline_mb']} MB"),
        (
            "RSS after load",
            f"{m['final_mb']} MB ({m['growth_pct']:+.2f}%, peak {m['peak_growth_pct']:+.2f}%)",
        ),
        ("target: same outputs", "PASS" if result["targets"]["same_outputs"] else "FAIL"),
        (
            f"target: RSS growth <= {MAX_GROWTH_PCT:.0f}%",
            "PASS" if result["targets"]["rss_growth_le_5pct"] else "FAIL",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"load test of {result['bundle']} ({result['digest'][:19]}…)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle folder or .tar.gz")
    parser.add_argument("--threads", type=int, default=8, help="caller threads [8]")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per pass [10000]")
    parser.add_argument("--warmup", type=int, default=500, help="threaded warm-up requests [500]")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads [1]")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON result [{RESULTS}]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args.bundle, args.threads, args.requests, args.warmup, args.ort_threads, args.out)
    _print(result, args.out)
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
