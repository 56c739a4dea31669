"""Validation: accuracy, fidelity to a reference, latency, size and memory, and the gates.

The model is an artifact run by onnxruntime; the reference is another artifact or the PyTorch
source it came from. Every figure of both is measured in the same process with the same thread
count, and speed-ups are ratios of p50 latencies measured there, so machine noise cancels.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trimformer import __version__
from trimformer.artifact import ModelArtifact
from trimformer.data import Encoder, TextDataset, load_dataset, map_labels
from trimformer.data.tokenizer import load_tokenizer
from trimformer.errors import GateFailed, UserError
from trimformer.fsutil import atomic_output_dir
from trimformer.progress import progress_bar
from trimformer.sources import load_source
from trimformer.validation.latency import PeakMemory, summarize, time_calls
from trimformer.validation.report_md import render_validation_markdown
from trimformer.validation.runners import (
    ModelRunner,
    OrtRunner,
    ProviderOptions,
    TorchRunner,
    default_threads,
    model_size_mb,
    resolve_provider,
)

__all__ = ["DEFAULT_GRID", "ValidateConfig", "parse_grid", "validate"]

logger = logging.getLogger(__name__)

DEFAULT_GRID = ((1, 128), (32, 128))
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def parse_grid(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x128,32x128"`` -> ((1, 128), (32, 128))."""
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            batch, seq = (int(x) for x in part.split("x"))
        except ValueError:
            raise UserError(
                f"bad grid entry {part!r}; write shapes as BATCHxSEQ, e.g. 1x128,32x128"
            ) from None
        if batch < 1 or seq < 1:
            raise UserError(f"bad grid entry {part!r}; batch and sequence must be positive")
        shapes.append((batch, seq))
    if not shapes:
        raise UserError("the latency grid is empty; give at least one BATCHxSEQ shape")
    return tuple(shapes)


@dataclass
class ValidateConfig:
    model: str
    data: str
    reference: str | None = None
    provider: str = "cpu"
    # Several providers: the model is measured on each (report["by_provider"]); gates apply to all.
    providers: tuple[str, ...] = ()
    provider_options: ProviderOptions = field(default_factory=ProviderOptions)
    threads: int | None = None
    grid: tuple[tuple[int, int], ...] = DEFAULT_GRID
    split: str = "auto"
    limit: int | None = None
    batch_size: int = 64
    warmup: int = 5
    runs: int = 30
    min_seconds: float = 1.0
    natural_samples: int = 100
    max_accuracy_drop: float | None = None
    min_speedup: float | None = None
    out: str | None = None
    overwrite: bool = True
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.runs < 1 or self.warmup < 0:
            raise UserError("--runs must be at least 1 and --warmup at least 0")
        if (self.max_accuracy_drop is not None or self.min_speedup is not None) and self.reference is None:
            raise UserError(
                "--max-accuracy-drop and --min-speedup compare against a reference; pass --reference"
            )
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UserError(f"--max-accuracy-drop must be at least 0 points, got {self.max_accuracy_drop}")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise UserError(f"--min-speedup must be positive, got {self.min_speedup}")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _predict(
    runner: ModelRunner, encoder: Encoder, dataset: TextDataset, batch_size: int, label: str
) -> np.ndarray:
    outputs = []
    total = (len(dataset) + batch_size - 1) // batch_size
    with progress_bar(f"evaluate {label}", total) as bar:
        for start in range(0, len(dataset), batch_size):
            stop = start + batch_size
            pairs = None if dataset.pairs is None else dataset.pairs[start:stop]
            outputs.append(
                np.asarray(runner.run(encoder(dataset.texts[start:stop], pairs)), dtype=np.float32)
            )
            bar.update(bar.task_ids[0], advance=1)
    return np.concatenate(outputs, axis=0)


def _latency(
    runner: ModelRunner, encoder: Encoder, dataset: TextDataset, config: ValidateConfig, label: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    latency: dict[str, Any] = {}
    throughput: dict[str, float] = {}
    with progress_bar(f"latency {label}", len(config.grid) + 1) as bar:
        for batch, seq in config.grid:
            rows = [dataset.texts[i % len(dataset)] for i in range(batch)]
            pairs = None if dataset.pairs is None else [dataset.pairs[i % len(dataset)] for i in range(batch)]
            feeds = encoder(rows, pairs, pad_to=seq)
            stats = summarize(time_calls(runner.timed(feeds), config.warmup, config.runs, config.min_seconds))
            key = f"{batch}x{seq}"
            latency[key] = stats.to_dict()
            throughput[key] = round(batch * 1000.0 / stats.mean, 2)
            bar.update(bar.task_ids[0], advance=1)
        natural: list[float] = []
        count = min(config.natural_samples, len(dataset))
        singles = [
            encoder([dataset.texts[i]], None if dataset.pairs is None else [dataset.pairs[i]])
            for i in range(count)
        ]
        calls = [runner.timed(feeds) for feeds in singles]
        for call in calls[: config.warmup]:
            call()
        for call in calls:
            natural.extend(time_calls(call, warmup=0, runs=1, min_seconds=0.0))
        bar.update(bar.task_ids[0], advance=1)
    stats = summarize(natural)
    return latency, throughput, {"p50": round(stats.p50, 4), "p90": round(stats.p90, 4)}


def _measure(
    runner: ModelRunner,
    encoder: Encoder,
    dataset: TextDataset,
    targets: np.ndarray | None,
    config: ValidateConfig,
    name: str,
    task: str,
    size_mb: float,
    label: str,
) -> tuple[dict[str, Any], np.ndarray]:
    outputs = _predict(runner, encoder, dataset, config.batch_size, label)
    accuracy = None
    if targets is not None and task == "sequence-classification":
        accuracy = round(float((outputs.argmax(-1) == targets).mean()), 6)
    latency, throughput, natural = _latency(runner, encoder, dataset, config, label)
    report = {
        "model": name,
        "task": task,
        "provider": runner.provider,
        "threads": int(getattr(runner, "threads", 0)),
        "n_examples": len(dataset),
        "accuracy": accuracy,
        "agreement": None,
        "mean_kl": None,
        "size_mb": size_mb,
        "latency_ms": latency,
        "throughput_per_s": throughput,
        "natural_latency_ms": natural,
    }
    return report, outputs


def _env() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "trimformer": __version__,
        "cpu": cpu,
    }


def _artifact_encoder(artifact: ModelArtifact) -> Encoder:
    spec = artifact.meta.tokenizer
    names = tuple(io.name for io in artifact.meta.inputs)
    return Encoder(load_tokenizer(artifact.path), names, spec.max_length, spec.pad_token_id)


def _open_reference(
    spec: str, threads: int, provider: str, options: ProviderOptions
) -> tuple[ModelRunner, Encoder, str, float, str]:
    """The reference runs with its own tokenizer and inputs (a PyTorch source or an artifact)."""
    path = Path(spec)
    if (path / "trimformer.json").is_file():
        art = ModelArtifact.open(path)
        return (
            OrtRunner(art, provider, threads, options),
            _artifact_encoder(art),
            str(path),
            model_size_mb(path),
            art.task,
        )
    source = load_source(spec)
    encoder = Encoder(source.tokenizer, source.io.input_names, source.max_length, source.pad_token_id)
    return TorchRunner(source, threads), encoder, str(spec), model_size_mb(source.folder), source.task


def _compare(
    report: dict[str, Any],
    outputs: np.ndarray,
    ref_report: dict[str, Any] | None,
    ref_outputs: np.ndarray | None,
    task: str,
) -> None:
    """Fill agreement, mean KL (or cosine), the reference and the speed-ups into ``report``."""
    report["reference"] = ref_report
    report["speedup"] = None
    if ref_report is None or ref_outputs is None:
        return
    if ref_outputs.shape != outputs.shape:
        raise UserError(
            f"the reference's outputs have shape {ref_outputs.shape[1:]} but the model's {outputs.shape[1:]}; "
            "compare models with the same labels"
        )
    if task == "sequence-classification":
        report["agreement"] = round(float((ref_outputs.argmax(-1) == outputs.argmax(-1)).mean()), 6)
        p, q = _softmax(ref_outputs.astype(np.float64)), _softmax(outputs.astype(np.float64))
        kl = (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(-1)
        report["mean_kl"] = round(max(0.0, float(kl.mean())), 8)
    else:
        cos = (ref_outputs * outputs).sum(-1) / (
            np.linalg.norm(ref_outputs, axis=-1) * np.linalg.norm(outputs, axis=-1) + 1e-12
        )
        report["mean_cosine"] = round(float(cos.mean()), 6)
    report["speedup"] = {
        key: round(ref_report["latency_ms"][key]["p50"] / stats["p50"], 3)
        for key, stats in report["latency_ms"].items()
    }


def _gates(report: dict[str, Any], config: ValidateConfig) -> dict[str, Any]:
    failed: list[str] = []
    ref = report["reference"]
    if config.max_accuracy_drop is not None and ref is not None:
        if report["accuracy"] is None or ref["accuracy"] is None:
            failed.append("max_accuracy_drop: accuracy needs a labelled dataset for both models")
        else:
            drop = round((ref["accuracy"] - report["accuracy"]) * 100.0, 4)
            if drop > config.max_accuracy_drop:
                failed.append(
                    f"max_accuracy_drop: accuracy fell {drop:.2f} points (limit {config.max_accuracy_drop:.2f})"
                )
    if config.min_speedup is not None and report["speedup"] is not None:
        for key, value in report["speedup"].items():
            if value < config.min_speedup:
                failed.append(f"min_speedup: {value:.2f}x at {key} (needs {config.min_speedup:.2f}x)")
    return {"passed": not failed, "failed": failed}


def validate(config: ValidateConfig) -> dict[str, Any]:
    """Measure the model (and reference), write report.json and report.md; raise GateFailed on a miss."""
    config.validate()
    artifact = ModelArtifact.open(config.model)
    threads = config.threads or default_threads()
    dataset = load_dataset(
        config.data,
        text_column=config.text_column,
        text_pair_column=config.text_pair_column,
        label_column=config.label_column,
        split=config.split,
        seed=config.seed,
        limit=config.limit,
    )
    targets = None
    if dataset.labels is not None and artifact.labels is not None:
        targets = map_labels(dataset.labels, artifact.labels)
    tok_spec = artifact.meta.tokenizer
    encoder = _artifact_encoder(artifact)
    for _, seq in config.grid:
        if seq > tok_spec.max_length:
            raise UserError(f"grid sequence length {seq} exceeds the model's maximum {tok_spec.max_length}")
    out_dir = Path(config.out) if config.out else artifact.path / "report"

    providers = list(config.providers) or [config.provider]
    for name in providers:
        resolve_provider(name)  # refuse a missing provider before measuring anything
    measured: list[tuple[dict[str, Any], np.ndarray]] = []
    for name in providers:
        with PeakMemory() as memory:
            runner = OrtRunner(artifact, name, threads, config.provider_options)
            one, outputs = _measure(
                runner,
                encoder,
                dataset,
                targets,
                config,
                str(config.model),
                artifact.task,
                round(artifact.size_bytes() / 1e6, 3),
                f"model ({name})",
            )
        one["peak_memory_mb"] = memory.peak_mb
        del runner
        measured.append((one, outputs))

    ref_report: dict[str, Any] | None = None
    ref_outputs: np.ndarray | None = None
    if config.reference is not None:
        with PeakMemory() as ref_memory:
            ref_runner, ref_encoder, ref_name, ref_size, ref_task = _open_reference(
                config.reference, threads, providers[0], config.provider_options
            )
            if ref_task != artifact.task:
                raise UserError(f"the reference is a {ref_task} model but the model is {artifact.task}")
            ref_report, ref_outputs = _measure(
                ref_runner, ref_encoder, dataset, targets, config, ref_name, ref_task, ref_size, "reference"
            )
        ref_report["peak_memory_mb"] = ref_memory.peak_mb
    for one, outputs in measured:
        _compare(one, outputs, ref_report, ref_outputs, artifact.task)
    report = measured[0][0]
    report["model_hash"] = artifact.model_hash()
    if len(measured) > 1:
        report["by_provider"] = {one["provider"]: dict(one) for one, _ in measured}
    failed: list[str] = []
    for one, _ in measured:
        prefix = f"[{one['provider']}] " if len(measured) > 1 else ""
        failed += [prefix + f for f in _gates(one, config)["failed"]]
    report["gates"] = {"passed": not failed, "failed": failed}
    report["env"] = _env()
    with atomic_output_dir(out_dir, overwrite=config.overwrite) as tmp:
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / REPORT_MD).write_text(render_validation_markdown(report), encoding="utf-8")
    report["report_dir"] = str(out_dir)
    if not report["gates"]["passed"]:
        raise GateFailed("validation gate failed: " + "; ".join(report["gates"]["failed"]))
    return report
