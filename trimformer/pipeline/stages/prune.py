"""The prune stage: artifact in, pruned artifact out, with its record, report and per-layer map.

Glue between the CLI (or a recipe) and the ``prune`` pass: reads the calibration data, computes
Fisher scores on the PyTorch source when one is given (checking that its weights are the graph's),
runs the pass, and writes ``pruning_record.json`` (replayable with
``trimformer.sources.pruning.apply_pruning_record``), ``pruning_report.json`` and
``pruning_map.png`` into the new artifact folder. Every check runs before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from trimformer.artifact import EXPORTED_FROM, ModelArtifact
from trimformer.data import Encoder
from trimformer.errors import UserError
from trimformer.formats.pruning_record import RECORD_FILE
from trimformer.fsutil import check_output_dir
from trimformer.onnx_io import probe_onnxruntime
from trimformer.passes.base import PassContext, PassReport, apply_pass, refuse_decoder
from trimformer.passes.graph import EncoderLayout, find_blocks
from trimformer.passes.prune.structured import PruneConfig
from trimformer.pipeline.context import (
    DataRequest,
    StageOptions,
    add_fisher_scores,
    build_pass_context,
    host_target,
    load_calibration,
)
from trimformer.pipeline.stages.params import PruneStageParams

__all__ = ["PruneStageConfig", "exported_from", "run_prune", "write_prune_outputs"]

logger = logging.getLogger(__name__)

REPORT_FILE = "pruning_report.json"
MAP_FILE = "pruning_map.png"
_DEFAULTS = PruneStageParams()


@dataclass
class PruneStageConfig(StageOptions):
    prune: PruneConfig
    source: str | None = None
    samples: int = _DEFAULTS.samples
    batch_size: int = _DEFAULTS.batch_size

    def data_request(self) -> DataRequest:
        PruneStageParams(samples=self.samples, batch_size=self.batch_size)  # the same checks as a recipe
        return DataRequest(
            calibration=self.calibration,
            samples=self.samples,
            batch_size=self.batch_size,
            columns=self.columns(),
            exact_rows=False,
            sort_by_length=True,
        )


def check_source_matches(source: Any, layout: EncoderLayout) -> None:
    """Refuse a PyTorch source whose projection weights are not the graph's."""
    from trimformer.sources.pruning import layer_modules

    mods = layer_modules(source.model)
    if len(mods) != len(layout.layers):
        raise UserError(
            f"--source has {len(mods)} layers, the graph {len(layout.layers)}; pass the model it came from"
        )
    for i, (m, layer) in enumerate(zip(mods, layout.layers, strict=True)):
        pairs = (
            (m.out.weight.detach().numpy().T, layer.attention.out.weight),
            (m.down.weight.detach().numpy().T, layer.ffn.down.weight),
        )
        for torch_w, onnx_w in pairs:
            if torch_w.shape != onnx_w.shape or not np.allclose(torch_w, onnx_w, atol=1e-4, rtol=1e-3):
                raise UserError(
                    f"--source weights do not match the ONNX graph (layer {i}); pass the PyTorch model it was exported from"
                )


def write_prune_outputs(folder: Path, stats: dict[str, Any]) -> None:
    """Write the record, the full report and the per-layer map next to the pruned model."""
    (folder / RECORD_FILE).write_text(json.dumps(stats["record"], indent=1) + "\n", encoding="utf-8")
    (folder / REPORT_FILE).write_text(json.dumps(stats, indent=1, default=float) + "\n", encoding="utf-8")
    plot_pruning_map(stats, folder / MAP_FILE)


def plot_pruning_map(stats: dict[str, Any], path: Path) -> None:
    """Per-layer map: kept heads (grid), kept neurons and FLOPs before/after (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = stats["record"]
    layers = record["layers"]
    heads = max(int(entry.get("num_heads", record["num_heads"])) for entry in layers)
    grid = np.zeros((len(layers), heads))
    for i, entry in enumerate(layers):
        grid[i, list(entry["kept_heads"])] = 1.0
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.5 * len(layers) + 2.2))
    axes[0].imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    idx = np.arange(len(layers))
    axes[0].set(
        title="kept heads (green)", xlabel="head", ylabel="layer", yticks=idx, xticks=np.arange(heads)
    )
    before = [row["neurons"] for row in stats["before"]["layers"]]
    after = [row["neurons"] for row in stats["after"]["layers"]]
    axes[1].barh(idx, before, color="lightgray", label="before")
    axes[1].barh(idx, after, color="tab:green", label="after")
    axes[1].set(title="feed-forward neurons", xlabel="neurons", ylabel="layer", yticks=idx)
    axes[1].invert_yaxis()
    axes[1].legend(loc="lower right")
    fb = [row["flops"] / 1e6 for row in stats["before"]["layers"]]
    fa = [row["flops"] / 1e6 for row in stats["after"]["layers"]]
    axes[2].barh(idx, fb, color="lightgray", label="before")
    axes[2].barh(idx, fa, color="tab:blue", label="after")
    axes[2].set(
        title=f"MFLOPs per sequence of {stats['seq_len']}", xlabel="MFLOPs", ylabel="layer", yticks=idx
    )
    axes[2].invert_yaxis()
    axes[2].legend(loc="lower right")
    fig.suptitle(
        f"{stats['flops_removed']:.0%} of encoder FLOPs, {stats['params_removed']:.0%} of encoder parameters "
        f"removed ({stats['importance']} importance)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


BLOCK_BATCH = 32


def _block_reconstruct(
    model: ir.Model, source: Any, dataset: Any, record: dict[str, Any], config: PruneStageConfig
) -> tuple[ir.Model, list[Any]]:
    import torch

    from trimformer.passes.prune.projections import GraphProjections
    from trimformer.passes.prune.reconstruct import ReconstructionStep
    from trimformer.training.block_reconstruct import BlockConfig, block_reconstruct

    encoder = Encoder(source.tokenizer, source.io.input_names, source.max_length, source.pad_token_id)
    count = min(config.samples, len(dataset))
    feeds = []
    for start in range(0, count, BLOCK_BATCH):
        stop = min(start + BLOCK_BATCH, count)
        pairs = None if dataset.pairs is None else dataset.pairs[start:stop]
        batch = encoder(dataset.texts[start:stop], pairs)
        feeds.append({name: torch.from_numpy(value) for name, value in batch.items()})
    block = BlockConfig(steps=config.prune.block_steps, lr=config.prune.block_lr)
    fits = block_reconstruct(GraphProjections(model), source, record, feeds, block)
    steps = [
        ReconstructionStep(
            f.layer, "layer", f.relative_error_before, f.relative_error_after, f.tokens, "gradient"
        )
        for f in fits
    ]
    return model, steps


def _exported_source(artifact: ModelArtifact) -> Any:
    """The loaded PyTorch model the artifact was exported from (the export records its folder),
    when that folder still holds the files the export hashed; else None."""
    folder = artifact.meta.extras.get(EXPORTED_FROM)
    if not isinstance(folder, str) or not Path(folder).is_dir() or artifact.meta.source_hash is None:
        return None
    from trimformer.sources import load_source

    try:
        source = load_source(folder)
    except UserError:
        return None
    return source if source.files_hash == artifact.meta.source_hash else None


def exported_from(artifact: ModelArtifact) -> str | None:
    """The folder of :func:`_exported_source`, or None."""
    source = _exported_source(artifact)
    return None if source is None else str(artifact.meta.extras[EXPORTED_FROM])


def _with_source(config: PruneStageConfig, artifact: ModelArtifact) -> tuple[PruneStageConfig, Any]:
    """Fisher importance and block reconstruction need the PyTorch model; without --source, the
    one the artifact was exported from (when unchanged; returned loaded, so it is read once), else
    a warning of what is lost."""
    if config.source is not None or config.prune.importance not in ("auto", "fisher"):
        return config, None
    found = _exported_source(artifact)
    if found is not None:
        folder = str(artifact.meta.extras[EXPORTED_FROM])
        logger.info("prune: Fisher importance and block reconstruction on %s (the export's source)", folder)
        return dataclasses.replace(config, source=folder), found
    if config.prune.importance == "fisher":
        raise UserError("importance 'fisher' needs the PyTorch model: pass --source PYTORCH_DIR")
    logger.warning(
        "prune: no PyTorch source (--source, or the unchanged folder the model was exported from): "
        "activation importance and the ridge refit only, which lose more accuracy (docs/PRUNING.md)"
    )
    return config, None


def _check_inputs(config: PruneStageConfig) -> None:
    """Refuse what cannot work before anything is read."""
    config.data_request()  # refuses samples or batch_size below 1
    prune = config.prune
    prune.check()
    if prune.importance in ("activation", "ablation") and config.calibration is None:
        raise UserError(f"importance {prune.importance!r} needs calibration data: pass --calibration DATA")
    if prune.importance == "fisher" and config.calibration is None:
        raise UserError("importance 'fisher' needs labelled calibration data: pass --calibration DATA")
    if prune.reconstruct and config.calibration is None:
        raise UserError(
            "reconstruction needs calibration data: pass --calibration DATA (or --no-reconstruct)"
        )


def _open_unpruned(config: PruneStageConfig) -> tuple[ModelArtifact, EncoderLayout]:
    artifact = ModelArtifact.open(config.model)
    refuse_decoder(artifact, "the prune pass")
    if "pruning" in artifact.meta.extras:
        raise UserError(
            f"{config.model} is already pruned; prune the unpruned artifact with a larger budget instead"
        )
    layout = find_blocks(ir.from_proto(artifact.load_model()).graph)
    # Pruning runs onnxruntime on this graph: one that would crash it natively fails here first.
    probe_onnxruntime(artifact.model_path)
    return artifact, layout


def _context(
    artifact: ModelArtifact, config: PruneStageConfig, layout: EncoderLayout, scratch: Path, loaded: Any
) -> tuple[PassContext, Any, Any]:
    """The pass context, the calibration rows and the PyTorch source (when given; ``loaded``: the
    source already read, else it is read here)."""
    request = config.data_request()
    dataset = load_calibration(artifact, request)
    ctx = build_pass_context(
        artifact, request, scratch, config.source, calibration_set=dataset, target=host_target(config.target)
    )
    source = None
    if config.source is not None:
        from trimformer.sources import load_source

        source = loaded if loaded is not None else load_source(config.source)
        check_source_matches(source, layout)
        if config.prune.importance in ("auto", "fisher") and dataset is not None:
            max_length = artifact.meta.tokenizer.max_length
            add_fisher_scores(ctx, source, dataset, config.samples, config.batch_size, max_length)
    return ctx, dataset, source


def _refine(
    layout: EncoderLayout, dataset: Any, source: Any, config: PruneStageConfig, full: dict[str, Any]
) -> Callable[[PassReport], PassReport]:
    """Block reconstruction on the PyTorch source after the pass (when it applies); the full
    statistics go to ``full`` (the report file), the lineage keeps the headline figures."""

    def refine(report: PassReport) -> PassReport:
        stats, model, prune = report.stats, report.model, config.prune
        if prune.reconstruct and prune.block_steps > 0 and source is not None:
            if layout.fused:
                logger.warning(
                    "block reconstruction skipped: the graph is fused (prune before fusing); ridge only"
                )
            else:
                started = time.perf_counter()
                model, steps = _block_reconstruct(model, source, dataset, stats["record"], config)
                stats["reconstruction"] += [s.to_dict() for s in steps]
                stats["seconds"]["block_reconstruction"] = round(time.perf_counter() - started, 2)
        full.update(stats)
        kept = {
            k: stats[k] for k in ("importance", "flops_removed", "params_removed", "exactness_max_abs_diff")
        }
        kept["heads_per_layer"] = [row["heads"] for row in stats["after"]["layers"]]
        kept["neurons_per_layer"] = [row["neurons"] for row in stats["after"]["layers"]]
        # Later passes (fusion) read per-layer head counts from here.
        extras = {
            "pruning": {
                "record": RECORD_FILE,
                "num_heads": kept["heads_per_layer"],
                "ffn_size": kept["neurons_per_layer"],
                "head_dim": layout.head_dim,
                "hidden_size": layout.hidden_size,
            }
        }
        return PassReport(model, True, kept, extras=extras)

    return refine


def _summary(stats: dict[str, Any], out: Path, seconds: float) -> dict[str, Any]:
    totals = ("heads", "neurons", "flops", "params")
    return {
        "artifact": str(out),
        "importance": stats["importance"],
        "flops_removed": stats["flops_removed"],
        "params_removed": stats["params_removed"],
        "before": {k: stats["before"][k] for k in totals},
        "after": {k: stats["after"][k] for k in totals},
        "layers": [
            {
                "layer": b["layer"],
                "heads": [b["heads"], a["heads"]],
                "neurons": [b["neurons"], a["neurons"]],
                "flops": [b["flops"], a["flops"]],
            }
            for b, a in zip(stats["before"]["layers"], stats["after"]["layers"], strict=True)
        ],
        "reconstruction": stats["reconstruction"],
        "size_bytes": stats["size_bytes"],
        "exactness_max_abs_diff": stats["exactness_max_abs_diff"],
        "seconds": seconds,
    }


def run_prune(config: PruneStageConfig) -> dict[str, Any]:
    """Prune an artifact; returns a summary (the full stats are in the report file)."""
    started = time.perf_counter()
    _check_inputs(config)
    check_output_dir(Path(config.out), config.overwrite)
    artifact, layout = _open_unpruned(config)
    config, loaded = _with_source(config, artifact)
    full: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trimformer-prune-") as scratch:
        ctx, dataset, source = _context(artifact, config, layout, Path(scratch), loaded)
        fisher_seconds = time.perf_counter() - started
        before = artifact.size_bytes()

        def write_outputs(folder: Path, _report: PassReport) -> None:
            full["seconds"]["fisher"] = round(fisher_seconds, 2)
            full["size_bytes"] = {"before": before}
            write_prune_outputs(folder, full)

        out = Path(config.out)
        params = {"calibration": config.calibration, "samples": config.samples, "source": config.source}
        pruned, _ = apply_pass(
            artifact,
            "prune",
            config.prune,
            ctx,
            out,
            overwrite=config.overwrite,
            extra_params=params,
            on_written=write_outputs,
            refine=_refine(layout, dataset, source, config, full),
        )
    full["size_bytes"]["after"] = pruned.size_bytes()
    (out / REPORT_FILE).write_text(json.dumps(full, indent=1, default=float) + "\n", encoding="utf-8")
    return _summary(full, out, round(time.perf_counter() - started, 2))
