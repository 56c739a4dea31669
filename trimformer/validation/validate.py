"""Validation: accuracy, fidelity to a reference, latency, size and memory, and the gates.

The model is an artifact run by onnxruntime; the reference is another artifact or the PyTorch
source it came from. Every figure of both is measured in the same process with the same thread
count, and speed-ups are ratios of p50 latencies measured there, so machine noise cancels.

No torch here: a PyTorch reference is opened by the caller's ``open_reference`` (see
:mod:`trimformer.validation.reference`); the CLI and recipes go through
:func:`trimformer.pipeline.stages.validate.run_validate`, which passes the PyTorch opener.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from trimformer import __version__
from trimformer.artifact import ModelArtifact
from trimformer.data import TextDataset, load_dataset, map_labels
from trimformer.errors import GateFailed, UserError
from trimformer.formats.targets import built_for, check_validating_cpu
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.fsutil import atomic_output_dir
from trimformer.progress import progress_bar
from trimformer.runtime.cpu import cpu_class, cpu_name
from trimformer.runtime.encoding import TextEncoder
from trimformer.runtime.session import resolve_provider
from trimformer.validation.decoder import (
    DecoderOpener,
    DecoderValidateConfig,
    decoder_texts,
    validate_decoder,
)
from trimformer.validation.latency import PeakMemory, summarize, time_calls
from trimformer.validation.reference import ReferenceOpener, artifact_encoder, load_reference
from trimformer.validation.report_md import render_decoder_markdown, render_validation_markdown
from trimformer.validation.runners import ModelRunner, OrtRunner, ProviderOptions, default_threads
from trimformer.validation.size import size_breakdown

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
    # The model files' size (model.onnx and its external data), in MB: an edge build's promise.
    max_size_mb: float | None = None
    out: str | None = None
    overwrite: bool = True
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Causal LMs: perplexity window, prompts, decode runs and their gates.
    decoder: DecoderValidateConfig = field(default_factory=DecoderValidateConfig)

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
        if self.max_size_mb is not None and not 0 < self.max_size_mb < float("inf"):
            raise UserError(f"--max-size-mb must be a positive number of MB, got {self.max_size_mb}")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _predict(
    runner: ModelRunner, encoder: TextEncoder, dataset: TextDataset, batch_size: int, label: str
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
    runner: ModelRunner, encoder: TextEncoder, dataset: TextDataset, config: ValidateConfig, label: str
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
    encoder: TextEncoder,
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


def _version(package: str) -> str:
    """An installed package's version from its metadata (importing torch just to ask it would
    load PyTorch into a torch-free validation)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _env() -> dict[str, str]:
    import onnx
    import onnxruntime

    cpu = cpu_name()
    return {
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": _version("torch"),
        "trimformer": __version__,
        "cpu": cpu,
        "cpu_class": cpu_class(),
    }


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
    if config.max_size_mb is not None and report["size_mb"] > config.max_size_mb:
        failed.append(
            f"max_size_mb: the model files are {report['size_mb']:.2f} MB (limit {config.max_size_mb:.2f})"
        )
    return {"passed": not failed, "failed": failed}


def _load_data(config: ValidateConfig, artifact: ModelArtifact) -> tuple[TextDataset, np.ndarray | None]:
    """The evaluation texts, and their labels as the model's class indices (None when unlabelled)."""
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
    return dataset, targets


def _measure_model(
    artifact: ModelArtifact,
    providers: list[str],
    threads: int,
    dataset: TextDataset,
    targets: np.ndarray | None,
    config: ValidateConfig,
) -> list[tuple[dict[str, Any], np.ndarray]]:
    """The model's report and outputs on each provider, one session at a time."""
    encoder = artifact_encoder(artifact)
    size_mb = round(artifact.size_bytes() / 1e6, 3)
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
                size_mb,
                f"model ({name})",
            )
        one["peak_memory_mb"] = memory.peak_mb
        del runner  # free the session before the next provider's is built
        measured.append((one, outputs))
    return measured


def _measure_reference(
    spec: str,
    artifact: ModelArtifact,
    provider: str,
    threads: int,
    dataset: TextDataset,
    targets: np.ndarray | None,
    config: ValidateConfig,
    opener: ReferenceOpener | None,
) -> tuple[dict[str, Any], np.ndarray]:
    with PeakMemory() as memory:
        ref = load_reference(spec, threads, provider, config.provider_options, opener)
        if ref.task != artifact.task:
            raise UserError(f"the reference is a {ref.task} model but the model is {artifact.task}")
        report, outputs = _measure(
            ref.runner, ref.encoder, dataset, targets, config, ref.name, ref.task, ref.size_mb, "reference"
        )
    report["peak_memory_mb"] = memory.peak_mb
    return report, outputs


def _combined_report(
    measured: list[tuple[dict[str, Any], np.ndarray]], artifact: ModelArtifact, config: ValidateConfig
) -> dict[str, Any]:
    """The first provider's report, with every provider's under ``by_provider`` and all gates."""
    report = measured[0][0]
    report["model_hash"] = artifact.model_hash()
    # The deployment target the model was built for (None before targets existed).
    report["target"] = built_for([step.params for step in artifact.meta.lineage])
    report["size_breakdown"] = size_breakdown(artifact)
    if len(measured) > 1:
        report["by_provider"] = {one["provider"]: dict(one) for one, _ in measured}
    failed: list[str] = []
    for one, _ in measured:
        prefix = f"[{one['provider']}] " if len(measured) > 1 else ""
        failed += [prefix + f for f in _gates(one, config)["failed"]]
    report["gates"] = {"passed": not failed, "failed": failed}
    report["env"] = _env()
    return report


def _validate_decoder(
    config: ValidateConfig, artifact: ModelArtifact, threads: int, opener: DecoderOpener | None
) -> dict[str, Any]:
    if (
        config.max_accuracy_drop is not None
        or config.min_speedup is not None
        or config.max_size_mb is not None
    ):
        raise UserError(
            "--max-accuracy-drop, --min-speedup and --max-size-mb are encoder gates; a causal LM takes "
            "--max-perplexity-increase, --min-token-agreement and --min-decode-speedup"
        )
    if config.provider != "cpu" or config.providers:
        raise UserError("causal LMs are validated on the cpu provider for now; drop --provider/--providers")
    texts = decoder_texts(config.data, config.split, config.seed, config.text_column, config.limit)
    report = validate_decoder(artifact, texts, config.decoder, config.reference, threads, opener)
    report["model_hash"] = artifact.model_hash()
    report["provider"] = "cpu"
    report["threads"] = threads
    report["env"] = _env()
    out_dir = Path(config.out) if config.out else artifact.path / "report"
    return _write_report(report, out_dir, config.overwrite, render_decoder_markdown(report))


def _write_report(report: dict[str, Any], out_dir: Path, overwrite: bool, markdown: str) -> dict[str, Any]:
    """report.json and report.md, written together; then the gates' verdict (GateFailed on a miss)."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / REPORT_MD).write_text(markdown, encoding="utf-8")
    report["report_dir"] = str(out_dir)
    if not report["gates"]["passed"]:
        raise GateFailed("validation gate failed: " + "; ".join(report["gates"]["failed"]))
    return report


def validate(
    config: ValidateConfig,
    open_reference: ReferenceOpener | None = None,
    open_decoder: DecoderOpener | None = None,
) -> dict[str, Any]:
    """Measure the model (and reference), write report.json and report.md; raise GateFailed on a miss.

    A reference that is not an artifact folder is opened by ``open_reference`` (the CLI and recipes
    pass the PyTorch one through :func:`trimformer.pipeline.stages.validate.run_validate`).
    """
    config.validate()
    artifact = ModelArtifact.open(config.model)
    target = built_for([step.params for step in artifact.meta.lineage])
    check_validating_cpu(target, cpu_class(), str(artifact.path))
    threads = config.threads or default_threads()
    if artifact.task == CAUSAL_LM:
        return _validate_decoder(config, artifact, threads, open_decoder)
    dataset, targets = _load_data(config, artifact)
    max_length = artifact.meta.tokenizer.max_length
    for _, seq in config.grid:
        if seq > max_length:
            raise UserError(f"grid sequence length {seq} exceeds the model's maximum {max_length}")
    out_dir = Path(config.out) if config.out else artifact.path / "report"
    providers = list(config.providers) or [config.provider]
    for name in providers:
        resolve_provider(name)  # refuse a missing provider before measuring anything
    measured = _measure_model(artifact, providers, threads, dataset, targets, config)
    ref_report: dict[str, Any] | None = None
    ref_outputs: np.ndarray | None = None
    if config.reference is not None:
        ref_report, ref_outputs = _measure_reference(
            config.reference, artifact, providers[0], threads, dataset, targets, config, open_reference
        )
    for one, outputs in measured:
        _compare(one, outputs, ref_report, ref_outputs, artifact.task)
    report = _combined_report(measured, artifact, config)
    return _write_report(report, out_dir, config.overwrite, render_validation_markdown(report))
