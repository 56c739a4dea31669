"""Measuring the produced variants into table rows (all in this one process and run)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Batch, SessionRunner
from bench.opcount import count_ops, measure_peak
from trimformer.progress import progress_bar
from trimformer.validation.latency import time_interleaved

__all__ = ["measure_variants"]


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _predict_all(run: Callable[[Batch], np.ndarray], encoder: Any, texts: Sequence[str]) -> np.ndarray:
    out = [np.asarray(run(encoder(texts[i : i + 64])), dtype=np.float32) for i in range(0, len(texts), 64)]
    return np.concatenate(out)


def _fidelity(out: np.ndarray, targets: np.ndarray, reference: np.ndarray | None) -> dict[str, Any]:
    """Accuracy, and agreement and mean KL with the PyTorch reference's logits (when there is one)."""
    fidelity: dict[str, Any] = {"accuracy": round(float((out.argmax(-1) == targets).mean()), 4)}
    if reference is None:
        return {**fidelity, "agreement": None, "mean_kl": None}
    ref = _softmax(reference)
    kl = (ref * (np.log(ref + 1e-12) - np.log(_softmax(out) + 1e-12))).sum(-1).mean()
    return {
        **fidelity,
        "agreement": round(float((out.argmax(-1) == reference.argmax(-1)).mean()), 4),
        "mean_kl": round(float(kl), 5),
    }


def _cycling(run: Callable[[Batch], np.ndarray], feeds: Sequence[Batch]) -> Callable[[], object]:
    """One call per feed in turn (real texts of natural length), wrapping around."""
    turn = itertools.cycle(feeds)
    return lambda: run(next(turn))


def _latency(
    runners: dict[str, Callable[[Batch], np.ndarray]],
    shapes: dict[str, dict[str, list[Batch]]],
    rounds: int,
) -> dict[str, dict[str, list[float]]]:
    """Samples in ms, ``result[variant][shape]``: interleaved rounds, every variant once per round
    in a rotating order, 20 calls per round of each batch-1 shape and 2 of 32x128. ``shapes`` holds
    each variant's own feeds (a trimmed vocabulary numbers the same texts differently)."""
    calls = {
        name: {shape: _cycling(run, feeds) for shape, feeds in shapes[name].items()}
        for name, run in runners.items()
    }
    per_round = {"1x128": 20, "natural": 20, "32x128": 2}
    with progress_bar("latency rounds", rounds) as bar:
        times = time_interleaved(
            calls,
            rounds=rounds,
            calls_per_round=per_round,
            warmup=5,
            after_round=lambda _: bar.update(bar.task_ids[0], advance=1),
        )
    return times.samples


def _size_mb(folder: Path) -> float:
    files = [p for p in folder.iterdir() if p.is_file() and (p.suffix in (".onnx", ".data", ".safetensors"))]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def _encoder(folder: Path, teacher: Path, pad_token_id: int) -> Any:
    """The encoder of a variant's own tokenizer.json, else the teacher's."""
    from trimformer.data import Encoder
    from trimformer.data.tokenizer import load_tokenizer

    names = ("input_ids", "attention_mask", "token_type_ids")
    source = folder if folder.is_dir() and (folder / "tokenizer.json").is_file() else teacher
    return Encoder(load_tokenizer(source), names, 128, pad_token_id)


def _shapes(encoder: Any, texts: Sequence[str]) -> dict[str, list[Batch]]:
    """The latency feeds: one text padded to 128, 200 texts at their own length, 32 x 128."""
    return {
        "1x128": [encoder([texts[0]], pad_to=128)],
        "natural": [encoder([t]) for t in texts[:200]],
        "32x128": [encoder(list(texts[:32]), pad_to=128)],
    }


def measure_variants(
    variants: list[Any], teacher: Path, threads: int, rounds: int, limit: int | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from trimformer.data import load_dataset, map_labels
    from trimformer.sources import load_source
    from trimformer.sources.runner import TorchRunner

    source = load_source(teacher)
    assert source.labels is not None
    test = load_dataset("builtin:tweets", split="test", limit=limit)
    targets = map_labels(test.labels or [], source.labels)
    live = [v for v in variants if v.skipped is None]
    # Each variant encodes with its own tokenizer (trim-vocab renumbers the vocabulary).
    encoders = {v.name: _encoder(teacher if v.torch else v.path, teacher, source.pad_token_id) for v in live}
    runners: dict[str, Any] = {}
    for v in live:
        if v.torch:
            runners[v.name] = TorchRunner(source, threads).run
        else:
            runners[v.name] = SessionRunner(v.path / "model.onnx", threads).run
    print("measuring accuracy ...", flush=True)
    logits = {name: _predict_all(run, encoders[name], test.texts) for name, run in runners.items()}
    reference = logits[live[0].name] if live and live[0].torch else None
    print("measuring latency ...", flush=True)
    samples = _latency(runners, {name: _shapes(encoders[name], test.texts) for name in runners}, rounds)
    print("measuring the machine's peak ...", flush=True)
    peaks = {"int8": measure_peak("MatMulInteger", threads), "fp32": measure_peak("MatMul", threads)}
    fp32_name = next((v.name for v in live if v.name.startswith("ORT FP32")), None)
    fp32_ops = count_ops(live[1].path / "model.onnx") if fp32_name else None
    rows: list[dict[str, Any]] = []
    fp32_p50 = float(np.percentile(samples[fp32_name]["1x128"], 50)) if fp32_name else None
    fp32_natural = float(np.percentile(samples[fp32_name]["natural"], 50)) if fp32_name else None
    for v in variants:
        row: dict[str, Any] = {"variant": v.name, "group": v.group, "note": v.note}
        if v.skipped is not None:
            row["skipped"] = v.skipped
            rows.append(row)
            continue
        out = logits[v.name]
        s = samples[v.name]
        p50 = float(np.percentile(s["1x128"], 50))
        ops = fp32_ops if v.torch else count_ops(v.path / "model.onnx")
        row.update(
            {
                **_fidelity(out, targets, reference),
                "p50_1x128_ms": round(p50, 3),
                "p90_1x128_ms": round(float(np.percentile(s["1x128"], 90)), 3),
                "p50_natural_ms": round(float(np.percentile(s["natural"], 50)), 3),
                "p90_natural_ms": round(float(np.percentile(s["natural"], 90)), 3),
                "throughput_32x128_per_s": round(32 * 1000.0 / float(np.median(s["32x128"])), 1),
                "speedup_vs_ort_fp32": None if fp32_p50 is None else round(fp32_p50 / p50, 3),
                # The same ratio on real tweets at their own length (batch 1): an edge build's workload.
                "speedup_natural_vs_ort_fp32": None
                if fp32_natural is None
                else round(fp32_natural / float(np.percentile(s["natural"], 50)), 3),
                "runs_1x128": len(s["1x128"]),
                "size_mb": _size_mb(v.path),
                "produce_seconds": v.produce.get("seconds"),
                "produce_peak_rss_mb": v.produce.get("peak_rss_mb"),
                "gops_1x128": None if ops is None else round(ops / 1e9, 3),
                "achieved_fraction_of_peak": None
                if ops is None
                else round(ops / (p50 / 1000.0) / peaks[v.precision], 4),
                "precision": v.precision,
            }
        )
        rows.append(row)
    machine = {
        "peak_int8_tops": round(peaks["int8"] / 1e12, 3),
        "peak_fp32_tflops": round(peaks["fp32"] / 1e12, 3),
        "test_examples": len(test),
    }
    return rows, machine
