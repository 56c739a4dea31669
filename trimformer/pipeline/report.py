"""The run report: every model a recipe produced, side by side, in JSON, Markdown and HTML.

``report.json`` is for machines; ``report.md`` for a pull request; ``report.html`` opens offline
(plots are PNGs embedded as base64, no script, no external file). Plots: accuracy against p50
latency for every variant with the Pareto front, the per-layer pruning map when a prune stage
ran, and the latency percentiles of each variant per shape.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trimformer import __version__
from trimformer.errors import UserError
from trimformer.formats.pruning_record import RECORD_FILE, kept_per_layer, load_pruning_record
from trimformer.formats.targets import built_for
from trimformer.fsutil import atomic_output_dir
from trimformer.validation.report_md import format_cell

if TYPE_CHECKING:
    from trimformer.pipeline.recipe import Recipe
    from trimformer.pipeline.runner import RunResult

__all__ = [
    "collect_report",
    "pareto_front",
    "render_html",
    "render_markdown",
    "write_run_report",
]

logger = logging.getLogger(__name__)


# -- collecting ---------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _variant_row(name: str, role: str, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "role": role,
        "accuracy": report.get("accuracy"),
        "size_mb": report.get("size_mb"),
        "peak_memory_mb": report.get("peak_memory_mb"),
        "latency_ms": report.get("latency_ms", {}),
        "natural_latency_ms": report.get("natural_latency_ms"),
        "agreement": report.get("agreement"),
        "speedup": report.get("speedup"),
        # A causal LM's measurements (trimformer.validation.decoder); absent for encoders.
        **{key: report[key] for key in _DECODER_KEYS if key in report},
    }


_DECODER_KEYS = (
    "perplexity",
    "perplexity_context",
    "token_agreement",
    "kl",
    "prompt_latency_ms",
    "time_to_first_token_ms",
    "decode_tokens_per_s",
)


def _decoder_table(info: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    contexts = list(info["variants"][-1].get("decode_tokens_per_s", {}))
    context = info["variants"][-1].get("perplexity_context")
    head = [
        "variant",
        "role",
        f"perplexity ({context}-token window)",
        "token agreement",
        "KL",
        "size (MB)",
        "prompt 1x128 (ms)",
        *[f"decode tokens/s @{c}" for c in contexts],
    ]
    rows = [
        [
            r["name"],
            r["role"],
            _fmt(r.get("perplexity")),
            _fmt(r.get("token_agreement"), 4),
            _fmt(r.get("kl"), 4),
            _fmt(r["size_mb"]),
            _fmt(r.get("prompt_latency_ms")),
            *[_fmt(r.get("decode_tokens_per_s", {}).get(c), 1) for c in contexts],
        ]
        for r in info["variants"]
    ]
    return head, rows


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, accuracy) points: True where no other point is at least as fast and as
    accurate and strictly better in one."""
    flags = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            (o_lat <= lat and o_acc >= acc) and (o_lat < lat or o_acc > acc)
            for j, (o_lat, o_acc) in enumerate(points)
            if j != i
        )
        flags.append(not dominated)
    return flags


def _pruning_for(folder: Path) -> list[dict[str, Any]]:
    """Per-layer heads and FFN neurons kept, from the pruning record the prune stage wrote."""
    if not (folder / RECORD_FILE).is_file():
        return []
    try:
        return kept_per_layer(load_pruning_record(folder))
    except UserError as exc:
        logger.warning("no pruning map for %s: %s", folder.name, exc)
        return []


def _target_of(folder: Path) -> str | None:
    """The deployment target the model in ``folder`` was built for, from its lineage."""
    lineage = (_read_json(folder / "trimformer.json") or {}).get("lineage") or []
    return built_for([step.get("params") or {} for step in lineage if isinstance(step, dict)])


def _variant_rows(
    folder: Path,
    final: dict[str, Any],
    final_name: str,
    reference_stage: str | None,
    artifact_stages: list[Any],
) -> tuple[list[dict[str, Any]], str | None]:
    """One provider's rows (reference, intermediates, final) with their Pareto flags, and the shape
    the flags are taken at."""
    rows = []
    ref = final.get("reference")
    if ref is not None:
        rows.append(_variant_row(reference_stage or "reference", "reference", ref))
    for p in artifact_stages:
        if p.name in (reference_stage, final_name):
            continue
        variant = _read_json(folder / p.name / "report.json")
        if variant is not None:
            rows.append(_variant_row(p.name, "intermediate", variant))
    rows.append(_variant_row(final_name, "final" if ref is not None else "final (reference)", final))
    shape = next(iter(final.get("latency_ms", {})), None)
    points = [
        (r["latency_ms"][shape]["p50"], r["accuracy"])
        for r in rows
        if shape in r["latency_ms"] and r["accuracy"] is not None
    ]
    flags = iter(pareto_front(points))
    for r in rows:
        r["pareto"] = next(flags) if shape in r["latency_ms"] and r["accuracy"] is not None else None
    return rows, shape


def collect_report(recipe: Recipe, result: RunResult) -> dict[str, Any]:
    """Gather every variant's numbers from the stage folders of a run."""
    by_name = {p.name: p for p in result.stages}
    done = {
        name: p for name, p in by_name.items() if p.action != "skip" and (p.folder / "stage.json").is_file()
    }
    artifact_stages = [p for p in result.stages if p.stage.artifact and p.name in done]
    stages = [
        {
            "name": p.name,
            "kind": p.stage.kind,
            "key": p.key[:16],
            "action": p.action,
            # When cached: how long it took when it was computed.
            "seconds": (_read_json(p.folder / "timing.json") or {}).get("seconds")
            if p.name in done
            else None,
            "result": (result.records.get(p.name) or {}).get("result"),
        }
        for p in result.stages
    ]
    providers: dict[str, Any] = {}
    size: dict[str, Any] | None = None
    validate = next((p for p in result.stages if p.stage.kind == "validate" and p.name in done), None)
    if validate is not None:
        reference_stage = validate.stage.inputs.get("reference")
        final_stage = validate.stage.inputs.get("model")
        for folder in sorted(p for p in validate.out.iterdir() if p.is_dir()):
            final = _read_json(folder / "final" / "report.json")
            if final is None:
                continue
            final_name = final_stage or "model"
            rows, shape = _variant_rows(folder, final, final_name, reference_stage, artifact_stages)
            providers[folder.name] = {
                "shape": shape,
                "variants": rows,
                "gates": final.get("gates"),
                "env": final.get("env"),
            }
            if final.get("size_breakdown") and size is None:
                size = {"model": final_name, **final["size_breakdown"]}
    pruning = []
    for p in artifact_stages:
        if p.stage.kind == "pass" and p.stage.params.get("pass") == "prune":
            layers = _pruning_for(p.out)
            if layers:
                pruning.append({"stage": p.name, "layers": layers})
    package = next((p for p in result.stages if p.stage.kind == "package" and p.name in done), None)
    return {
        "recipe": str(recipe.path) if recipe.path else None,
        "name": recipe.name,
        "trimformer": __version__,
        "workdir": str(result.workdir),
        "stages": stages,
        "providers": providers,
        "pruning": pruning,
        "size": _with_limit(size, recipe),
        "target": _target_of(artifact_stages[-1].out) if artifact_stages else None,
        "gates_passed": result.gates_passed,
        "gate_failures": result.gate_failures,
        "bundle": str(package.out / "bundle") if package is not None else None,
    }


def _with_limit(size: dict[str, Any] | None, recipe: Recipe) -> dict[str, Any] | None:
    """The final model's size breakdown and the recipe's size gate, if any."""
    if size is None:
        return None
    section = recipe.validate_
    return {**size, "limit_mb": None if section is None else section.gates.max_size_mb}


# -- plots --------------------------------------------------------------------------------------
_SIZE_PARTS = (
    ("embeddings_mb", "embedding tables"),
    ("encoder_mb", "encoder"),
    ("tokenizer_mb", "tokenizer"),
)


def _size_plot(plt: Any, size: dict[str, Any]) -> bytes:
    """One stacked bar: where the shipped bytes go, against the size gate."""
    fig, ax = plt.subplots(figsize=(7.0, 1.9))
    left = 0.0
    for (key, label), color in zip(_SIZE_PARTS, ("#4c72b0", "#55a868", "#c44e52"), strict=True):
        width = float(size[key])
        ax.barh([0], [width], left=left, color=color, label=f"{label} {width:.2f} MB")
        left += width
    if size.get("limit_mb"):
        ax.axvline(size["limit_mb"], color="black", linestyle="--", label=f"gate {size['limit_mb']:g} MB")
    ax.set_yticks([])
    ax.set_xlabel("MB")
    ax.set_xlim(0, max(left, size.get("limit_mb") or 0) * 1.08)
    # The gate bounds the model files (the first two parts); the tokenizer ships beside them.
    ax.set_title(
        f"{size['model']}: model files {size['model_files_mb']:.2f} MB, tokenizer {size['tokenizer_mb']:.2f} MB"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=4, fontsize=8, frameon=False)
    return _png(fig)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # No timestamp or software tag: the same numbers give the same bytes.
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _pareto_plot(plt: Any, provider: str, shape: str, scored: list[dict[str, Any]]) -> bytes:
    """Accuracy against p50 latency of every scored variant, the Pareto front in green."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["latency_ms"][shape]["p50"] for r in scored]
    ys = [r["accuracy"] * 100 for r in scored]
    colors = ["tab:green" if r["pareto"] else "tab:gray" for r in scored]
    ax.scatter(xs, ys, c=colors, s=60, zorder=3)
    for r, x, y in zip(scored, xs, ys, strict=True):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = sorted((x, y) for r, x, y in zip(scored, xs, ys, strict=True) if r["pareto"])
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:green", alpha=0.6)
    ax.set_xlabel(f"p50 latency at {shape} (ms, {provider})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy against latency (green: Pareto front)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _decode_plot(plt: Any, provider: str, rows: list[dict[str, Any]]) -> bytes:
    """A causal LM's decode tokens/s per variant, one bar group per cache length."""
    contexts = list(rows[-1]["decode_tokens_per_s"])
    fig, ax = plt.subplots(figsize=(1.8 * len(contexts) * max(1, len(rows)) / 2 + 3, 3.8))
    width = 0.8 / len(rows)
    for index, row in enumerate(rows):
        values = [row["decode_tokens_per_s"].get(c, 0.0) for c in contexts]
        positions = [i + index * width for i in range(len(contexts))]
        bars = ax.bar(positions, values, width, label=f"{row['name']} ({row['role']})")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(
        [i + width * (len(rows) - 1) / 2 for i in range(len(contexts))],
        [f"{c}-token cache" for c in contexts],
    )
    ax.set_ylabel(f"decode tokens/s, batch 1 ({provider})")
    ax.set_title("Decode speed (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _latency_plot(plt: Any, provider: str, rows: list[dict[str, Any]]) -> bytes:
    """p50 to p99 latency of every variant, one panel per measured shape."""
    shapes = list(rows[-1]["latency_ms"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.6 * len(shapes) + 1, 3.8), squeeze=False)
    for ax, key in zip(axes[0], shapes, strict=True):
        names = [r["name"] for r in rows if key in r["latency_ms"]]
        stats = [r["latency_ms"][key] for r in rows if key in r["latency_ms"]]
        pos = range(len(stats))
        ax.vlines(pos, [s["p50"] for s in stats], [s["p99"] for s in stats], color="tab:blue", lw=2)
        ax.scatter(pos, [s["p50"] for s in stats], color="tab:blue", label="p50", zorder=3)
        for quantile, color in (("p90", "tab:orange"), ("p99", "tab:red")):
            values = [s[quantile] for s in stats]
            ax.scatter(pos, values, marker="_", s=200, color=color, label=quantile, zorder=3)
        ax.set_xticks(list(pos), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{key} ({provider})")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Latency distribution per variant (p50 to p99)")
    fig.tight_layout()
    return _png(fig)


def _pruning_plot(plt: Any, entry: dict[str, Any]) -> bytes | None:
    """The kept fraction of heads and FFN channels per layer; None when nothing was counted."""
    layers = entry["layers"]
    kinds = [what for what in ("heads", "ffn") if any(layer[f"{what}_total"] for layer in layers)]
    if not kinds:
        return None
    rows = [
        [
            (layer[f"{what}_kept"] or 0) / layer[f"{what}_total"] if layer[f"{what}_total"] else float("nan")
            for layer in layers
        ]
        for what in kinds
    ]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(layers) + 2), 1.2 + 0.8 * len(rows)))
    image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for y, what in enumerate(kinds):
        for x, layer in enumerate(layers):
            if layer[f"{what}_total"]:
                text = f"{layer[f'{what}_kept']}/{layer[f'{what}_total']}"
                color = "white" if rows[y][x] < 0.6 else "black"
                ax.text(x, y, text, ha="center", va="center", color=color, fontsize=8)
    labels = ["attention heads" if what == "heads" else "FFN channels" for what in kinds]
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_title(f"Kept after {entry['stage']} (fraction)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _png(fig)


def _plots(report: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    for provider, info in report["providers"].items():
        shape = info["shape"]
        rows = [r for r in info["variants"] if shape in r["latency_ms"]]
        scored = [r for r in rows if r["accuracy"] is not None]
        if scored:
            plots[f"pareto-{provider}.png"] = _pareto_plot(plt, provider, shape, scored)
        if rows:
            plots[f"latency-{provider}.png"] = _latency_plot(plt, provider, rows)
        decoding = [r for r in info["variants"] if r.get("decode_tokens_per_s")]
        if decoding:
            plots[f"decode-{provider}.png"] = _decode_plot(plt, provider, decoding)
    if report.get("size"):
        plots["size.png"] = _size_plot(plt, report["size"])
    for entry in report["pruning"]:
        png = _pruning_plot(plt, entry)
        if png is not None:
            plots[f"pruning-{entry['stage']}.png"] = png
    return plots


# -- rendering ----------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    return format_cell(value, digits)


def _variant_table(info: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    if info["variants"] and "perplexity" in info["variants"][-1]:
        return _decoder_table(info)
    shapes = list(info["variants"][-1]["latency_ms"]) if info["variants"] else []
    head = ["variant", "role", "accuracy (%)", "size (MB)", *[f"p50 {s} (ms)" for s in shapes], "Pareto"]
    rows = []
    for r in info["variants"]:
        acc = None if r["accuracy"] is None else r["accuracy"] * 100
        lat = [_fmt(r["latency_ms"].get(s, {}).get("p50")) for s in shapes]
        pareto = "yes" if r["pareto"] else ("" if r["pareto"] is None else "no")
        rows.append([r["name"], r["role"], _fmt(acc), _fmt(r["size_mb"]), *lat, pareto])
    return head, rows


def _stage_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["stage", "kind", "key", "this run", "compute seconds"]
    rows = [[s["name"], s["kind"], s["key"], s["action"], _fmt(s["seconds"], 1)] for s in report["stages"]]
    return head, rows


def _gate_lines(report: dict[str, Any]) -> list[str]:
    if report["gates_passed"] is None:
        return ["no validation ran"]
    if report["gates_passed"]:
        return ["all gates passed"]
    return ["FAILED: " + failure for failure in report["gate_failures"]]


def _size_table(size: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [[label, _fmt(size[key])] for key, label in _SIZE_PARTS]
    rows.append(["model files (the size gate)", _fmt(size["model_files_mb"])])
    if size.get("limit_mb"):
        rows.append(["gate", f"at most {size['limit_mb']:g}"])
    return ["part", "MB"], rows


def render_markdown(report: dict[str, Any], plot_files: list[str]) -> str:
    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *["| " + " | ".join(r) + " |" for r in rows],
        ]

    title = report["name"] or report["recipe"] or "recipe"
    lines = [f"# Run report: {title}", "", "## Gates", "", *[f"- {g}" for g in _gate_lines(report)], ""]
    for provider, info in report["providers"].items():
        lines += [f"## Variants ({provider})", "", *table(*_variant_table(info)), ""]
    if report.get("size"):
        lines += [f"## Size ({report['size']['model']})", "", *table(*_size_table(report["size"])), ""]
    if report["pruning"]:
        for entry in report["pruning"]:
            lines += [f"## Pruning map ({entry['stage']})", ""]
            lines += table(
                ["layer", "heads kept", "FFN kept"],
                [
                    [
                        str(layer["layer"]),
                        f"{_fmt(layer['heads_kept'])}/{_fmt(layer['heads_total'])}",
                        f"{_fmt(layer['ffn_kept'])}/{_fmt(layer['ffn_total'])}",
                    ]
                    for layer in entry["layers"]
                ],
            )
            lines.append("")
    lines += ["## Stages", "", *table(*_stage_table(report)), ""]
    if report["bundle"]:
        lines += [f"Bundle: `{report['bundle']}`", ""]
    if plot_files:
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in plot_files], ""]
    lines += [f"trimformer {report['trimformer']}", ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    esc = html.escape

    def table(head: list[str], rows: list[list[str]]) -> str:
        out = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
        for row in rows:
            out += "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
        return out + "</table>"

    title = esc(report["name"] or report["recipe"] or "recipe")
    passed = report["gates_passed"]
    badge = "ok" if passed else ("fail" if passed is False else "none")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>trimformer run report: {title}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}.ok{color:#176f2c}.fail{color:#b00020}.none{color:#666}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>Run report: {title}</h1>",
        f'<h2>Gates</h2><ul class="{badge}">'
        + "".join(f"<li>{esc(g)}</li>" for g in _gate_lines(report))
        + "</ul>",
    ]
    for provider, info in report["providers"].items():
        parts.append(f"<h2>Variants ({esc(provider)})</h2>" + table(*_variant_table(info)))
    if report.get("size"):
        parts.append(f"<h2>Size ({esc(report['size']['model'])})</h2>" + table(*_size_table(report["size"])))
    for name, data in plots.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{encoded}"></figure>')
    parts.append("<h2>Stages</h2>" + table(*_stage_table(report)))
    if report["bundle"]:
        parts.append(f"<p>Bundle: <code>{esc(report['bundle'])}</code></p>")
    parts.append(f"<p>trimformer {esc(report['trimformer'])}</p></body></html>")
    return "\n".join(parts) + "\n"


def write_run_report(recipe: Recipe, result: RunResult, out: Path) -> Path:
    """Write report.json, report.md, report.html and the PNG plots into ``out`` (atomically)."""
    report = collect_report(recipe, result)
    plots = _plots(report)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        for name, data in plots.items():
            (tmp / name).write_bytes(data)
        (tmp / "report.md").write_text(render_markdown(report, list(plots)), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report, plots), encoding="utf-8")
    return out
