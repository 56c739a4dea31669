"""Per-text cost of the session behind `trimformer serve`: intra-op threads x concurrent calls x batch.

    python -m bench.serve_lanes --bundle DIR_OR_TAR_GZ

Offline (no HTTP): 512 test tweets sorted by length, cut into calls of ``batch`` texts, the calls
spread over ``lanes`` Python threads sharing one session built with ``threads`` intra-op threads;
the best of two rounds, in ms per text. It tells how much a server can gain from batching (batch)
against running calls side by side (lanes) on the CPU it runs on (docs/SERVING.md).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from trimformer.runtime import Predictor

CONFIGS = [(None, 1, 1), (None, 1, 8), (None, 2, 8), (1, 2, 1), (1, 2, 8), (1, 2, 16)]


def ms_per_text(bundle: str, texts: list[str], threads: int | None, lanes: int, batch: int) -> float:
    predictor = Predictor(bundle, threads=threads)
    rows = sorted(predictor.encode(texts), key=len)
    calls = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    predictor.infer(calls[0])
    best = float("inf")
    for _ in range(2):
        workers = [
            threading.Thread(target=lambda part: [predictor.infer(c) for c in part], args=(calls[k::lanes],))
            for k in range(lanes)
        ]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, (time.perf_counter() - started) / len(rows) * 1e3)
    return round(best, 3)


def main() -> None:
    from trimformer.data import load_dataset
    from trimformer.runtime.cpu import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    args = parser.parse_args()
    texts = list(load_dataset("builtin:tweets", split="test", limit=512).texts)
    print(json.dumps({"cpu": cpu_name(), "bundle": args.bundle}))
    for threads, lanes, batch in CONFIGS:
        cost = ms_per_text(args.bundle, texts, threads, lanes, batch)
        print(
            json.dumps({"threads": threads, "lanes": lanes, "batch": batch, "ms_per_text": cost}), flush=True
        )


if __name__ == "__main__":
    main()
