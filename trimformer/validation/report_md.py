"""Markdown rendering of a validation report, for pull requests and build logs."""

from __future__ import annotations

from typing import Any

__all__ = ["format_cell", "render_decoder_markdown", "render_validation_markdown"]


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


_DECODER_ROWS = (
    ("perplexity", "perplexity"),
    ("prompt latency, 1x128 (ms)", "prompt_latency_ms"),
    ("time to first token (ms)", "time_to_first_token_ms"),
    ("peak memory (MB)", "peak_memory_mb"),
    ("size (MB)", "size_mb"),
)


def render_decoder_markdown(report: dict[str, Any]) -> str:
    """A causal LM's report: perplexity, speed and memory beside the reference's, then fidelity and gates."""
    ref = report.get("reference")
    lines = [
        f"# Validation: {report['model']} (causal LM)",
        "",
        f"Perplexity over {report['perplexity_tokens']} test tokens, sliding window of "
        f"{report['perplexity_context']} tokens; CPU: {report['env']['cpu']}, {report['threads']} threads.",
        "",
        "| measure | model | reference |",
        "|---|---|---|",
    ]
    for label, key in _DECODER_ROWS:
        lines.append(
            f"| {label} | {format_cell(report.get(key))} | {format_cell(ref.get(key) if ref else None)} |"
        )
    for ctx, value in report["decode_tokens_per_s"].items():
        theirs = ref["decode_tokens_per_s"].get(ctx) if ref else None
        lines.append(
            f"| decode tokens/s, context {ctx} | {format_cell(value, 2)} | {format_cell(theirs, 2)} |"
        )
    if ref:
        lines += [
            "",
            f"Greedy-token agreement with the reference: {report['token_agreement']:.4f} over "
            f"{report['tokens']} tokens of {report['prompts']} prompts; mean KL {report['kl']:.6f}; perplexity "
            f"{report['perplexity_increase_pct']:+.2f} %; decode speed-up "
            + ", ".join(f"{v:.2f}x at {c}" for c, v in report["decode_speedup"].items()),
        ]
    gates = report["gates"]
    lines += ["", "Gates: " + ("passed" if gates["passed"] else "FAILED: " + "; ".join(gates["failed"])), ""]
    return "\n".join(lines)
