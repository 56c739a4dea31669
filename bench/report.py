"""Printing and writing the benchmark: the table, bench/results/<date>.json, docs/BENCHMARKS.md, a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_outputs"]

COLUMNS = [
    ("accuracy", "test acc"),
    ("agreement", "agree"),
    ("mean_kl", "KL"),
    ("p50_1x128_ms", "p50 1x128 ms"),
    ("p90_1x128_ms", "p90 1x128"),
    ("p50_natural_ms", "p50 nat"),
    ("p90_natural_ms", "p90 nat"),
    ("throughput_32x128_per_s", "32x128 /s"),
    ("speedup_vs_ort_fp32", "x ORT FP32"),
    ("speedup_natural_vs_ort_fp32", "x FP32 nat"),
    ("size_mb", "MB"),
    ("produce_seconds", "make s"),
    ("produce_peak_rss_mb", "make MB"),
    ("gops_1x128", "Gops"),
    ("achieved_fraction_of_peak", "of peak"),
]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['variant']} | skipped: {row['skipped']} |" + " |" * (len(COLUMNS) - 1))
        else:
            lines.append(f"| {row['variant']} | " + " | ".join(_cell(row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"baseline": "tab:gray", "peer": "tab:orange", "trimformer": "tab:blue"}
    for row in rows:
        if "skipped" in row:
            continue
        ax.scatter(row["p50_1x128_ms"], row["accuracy"], color=colors[row["group"]], s=40)
        ax.annotate(
            row["variant"],
            (row["p50_1x128_ms"], row["accuracy"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xlabel("p50 latency at 1x128 (ms, lower is better)")
    ax.set_ylabel("test accuracy")
    ax.set_title("MiniLM tweets teacher: accuracy against latency (one run)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict[str, Any]], header: dict[str, Any], root: Path) -> None:
    table = markdown_table(rows)
    print(table, flush=True)
    results = root / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{header['date']}.json").write_text(
        json.dumps({"header": header, "rows": rows}, indent=2) + "\n"
    )
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    _plot(rows, docs / "bench_accuracy_latency.png")
    section = "\n".join(
        [
            "<!-- bench:begin (written by `make bench`; edit the text outside these markers) -->",
            f"Measured {header['date']} on `{header['cpu']}`, {header['threads']} threads, Python {header['python']}; "
            f"command `{header['command']}`; {header['test_examples']} test tweets.",
            "Versions: "
            + ", ".join(f"{k} {v}" for k, v in header.get("versions", {}).items())
            + " (peers: their own venvs, bench/peers/*.txt).",
            f"Machine peak through onnxruntime (2048² MatMul): int8 {header['peak_int8_tops']} Tops/s, "
            f"FP32 {header['peak_fp32_tflops']} TFLOP/s.",
            "",
            table,
            "",
            "![accuracy against latency](bench_accuracy_latency.png)",
            "<!-- bench:end -->",
        ]
    )
    doc = docs / "BENCHMARKS.md"
    if doc.is_file() and "<!-- bench:begin" in doc.read_text():
        text = doc.read_text()
        start, end = (
            text.index("<!-- bench:begin"),
            text.index("<!-- bench:end -->") + len("<!-- bench:end -->"),
        )
        doc.write_text(text[:start] + section + text[end:])
    else:
        doc.write_text("# Benchmarks\n\n" + section + "\n")
