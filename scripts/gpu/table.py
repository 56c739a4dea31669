"""Turn the device run's report.json files into one markdown table (docs/BENCHMARKS.md, GPU section)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    print("| variant | provider | accuracy | agreement | p50 1x128 ms | p99 1x128 ms | 32x128 per s | MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("fp32", "fp16", "trt-int8"):
        path = out / f"{name}.json"
        if not path.is_file() or not path.read_text().strip():
            print(f"| {name} | - | failed: see the run's log | | | | | |")
            continue
        report = json.loads(path.read_text())
        if "skipped" in report:
            print(f"| {name} | - | skipped: {report['skipped']} | | | | | |")
            continue
        lat = report["latency_ms"]["1x128"]
        print(f"| {name} | {report['provider']} | {report['accuracy']} | {report['agreement']} | {lat['p50']:.3f} | "
              f"{lat['p99']:.3f} | {report['throughput_per_s']['32x128']:.0f} | {report['size_mb']:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
