"""Markdown rendering of a validation report, for pull requests and build logs."""

from __future__ import annotations

from typing import Any

__all__ = ["format_cell", "render_validation_markdown"]


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell: "-" for missing, floats to ``digits`` places."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _rows(report: dict[str, Any], label: str) -> list[str]:
    rows = []
    for key, stats in report["latency_ms"].items():
        rows.append(
            f"| {label} | {key} | {stats['p50']:.2f} | {stats['p90']:.2f} | {stats['p99']:.2f} | "
            f"{report['throughput_per_s'][key]:.1f} |"
        )
    natural = report["natural_latency_ms"]
    rows.append(f"| {label} | natural x1 | {natural['p50']:.2f} | {natural['p90']:.2f} | - | - |")
    return rows


def render_validation_markdown(report: dict[str, Any]) -> str:
    ref = report.get("reference")
    lines = [
        f"# Validation of `{report['model']}`",
        "",
        f"Task `{report['task']}`, provider `{report['provider']}`, {report['threads']} threads, "
        f"{report['n_examples']} examples.",
        "",
        "| | model | reference |",
        "|---|---|---|",
        f"| accuracy | {format_cell(report['accuracy'])} | {format_cell(ref['accuracy'] if ref else None)} |",
        f"| agreement with reference | {format_cell(report['agreement'])} | |",
        f"| mean KL vs reference | {format_cell(report['mean_kl'], 6)} | |",
        f"| size (MB) | {format_cell(report['size_mb'], 2)} | {format_cell(ref['size_mb'] if ref else None, 2)} |",
        f"| peak memory (MB) | {format_cell(report.get('peak_memory_mb'), 1)} | "
        f"{format_cell(ref.get('peak_memory_mb') if ref else None, 1)} |",
        "",
        "## Latency (ms)",
        "",
        "| variant | shape | p50 | p90 | p99 | per second |",
        "|---|---|---|---|---|---|",
        *_rows(report, "model"),
        *(_rows(ref, "reference") if ref else []),
        "",
    ]
    if report.get("speedup"):
        lines += ["## Speed-up over the reference (p50)", ""]
        lines += [f"- {key}: {value:.2f}x" for key, value in report["speedup"].items()]
        lines.append("")
    gates = report["gates"]
    lines.append("## Gates: " + ("passed" if gates["passed"] else "FAILED"))
    lines += [f"- {failure}" for failure in gates["failed"]]
    env = report["env"]
    lines += [
        "",
        f"onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, torch {env['torch']}, "
        f"trimformer {env['trimformer']}, CPU: {env['cpu']}",
        "",
    ]
    return "\n".join(lines)
