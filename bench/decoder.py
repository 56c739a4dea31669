"""Decoder export and decode speed on a SmolLM-135M-shaped Llama (random weights, config in code).

    python -m bench.decoder [--out bench/results/decoder.json] [--threads 2]

Measures, on the CPU it runs on (stated in the result):

1. the export's memory: the process's peak RSS during ``export_source`` over the RSS with the model
   loaded and its weights read once (they are memory-mapped: unread, they are not resident yet);
   the target: under 2x the model's fp32 size; and the export's seconds;
2. decode tokens/s at batch 1 after a 128-token prompt: the exported fp32 graph stepping its cache
   (``runtime.decoding.CachedSession``) against PyTorch eager with its own cache, same threads,
   rounds interleaved, medians;
3. the step time over new tokens 1-100 and 400-500 of a 500-token greedy generation through the
   graph, three times (the median ratio): with the cache kept, later steps may cost more only by the
   attention over the longer cache.

No hub: the weights are random (seeded) and the tokenizer is the tests' small BPE, which the model's
49152-entry embedding table covers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

SMOLLM_135M = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def _make_model(folder: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.builders import make_bpe_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM_135M))
    model.save_pretrained(str(folder), safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=make_bpe_tokenizer(), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


class _PeakRss:
    """Polls this process's RSS every 5 ms (ru_maxrss cannot be reset between phases)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _export(folder: Path, out: Path, fp32_bytes: int) -> dict[str, Any]:
    from trimformer.exporters import export_source
    from trimformer.sources import load_source

    source = load_source(folder)
    # The weights are memory-mapped from model.safetensors: read each once so that the baseline is
    # the model in memory, as it is once it has run (else the export's first touch of each weight
    # would be counted as the export's memory).
    with torch.inference_mode():
        for parameter in source.model.parameters():
            parameter.sum()
    loaded = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with _PeakRss() as peak:
        result = export_source(source, out, atol=1e-3)
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "rss_with_model_mb": round(loaded / 1e6, 1),
        "peak_rss_mb": round(peak.peak / 1e6, 1),
        "export_peak_over_loaded_mb": round((peak.peak - loaded) / 1e6, 1),
        "ratio_to_fp32_size": round((peak.peak - loaded) / fp32_bytes, 3),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        "parity": result.details["greedy_parity"],
        "size_mb": result.to_dict()["size_mb"],
    }


def _decode_speed(folder: Path, out: Path, threads: int, rounds: int, steps: int) -> dict[str, Any]:
    from trimformer.artifact import ModelArtifact
    from trimformer.formats.decoder import DecoderSpec
    from trimformer.runtime.decoding import CachedSession
    from trimformer.runtime.session import cpu_session
    from trimformer.sources import load_source

    torch.set_num_threads(threads)
    model = load_source(folder).model
    spec = DecoderSpec.from_extras(ModelArtifact.open(out).meta.extras)
    session = CachedSession(cpu_session(out / "model.onnx", threads=threads), spec)
    prompt = np.random.default_rng(0).integers(3, 300, size=(1, 128)).astype(np.int64)

    def onnx_run() -> float:
        logits, state = session.prompt(prompt, np.ones_like(prompt))
        token = np.argmax(logits[:, -1:], axis=-1)
        started = time.perf_counter()
        for _ in range(steps):
            logits, state = session.step(token, state)
            token = np.argmax(logits[:, -1:], axis=-1)
        return steps / (time.perf_counter() - started)

    def torch_run() -> float:
        with torch.inference_mode():
            out_ = model(input_ids=torch.from_numpy(prompt), use_cache=True)
            token = out_.logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            for _ in range(steps):
                out_ = model(input_ids=token, past_key_values=out_.past_key_values, use_cache=True)
                token = out_.logits[:, -1:].argmax(-1)
            return steps / (time.perf_counter() - started)

    onnx_run(), torch_run()  # warm-up
    speeds: dict[str, list[float]] = {"onnx_fp32": [], "pytorch_eager": []}
    for index in range(rounds):
        order = [("onnx_fp32", onnx_run), ("pytorch_eager", torch_run)]
        for name, run in order if index % 2 == 0 else reversed(order):
            speeds[name].append(run())
    medians = {name: round(statistics.median(v), 2) for name, v in speeds.items()}
    return {
        "context": 128,
        "steps": steps,
        "rounds": rounds,
        "tokens_per_s": medians,
        "onnx_over_pytorch": round(medians["onnx_fp32"] / medians["pytorch_eager"], 3),
    }


def _step_growth(out: Path, threads: int, repeats: int = 3) -> dict[str, Any]:
    """Median step time over new tokens 1-100 and 400-500 of a 500-token greedy generation,
    ``repeats`` times; the ratio reported is the median of the repeats' ratios (one generation's
    medians move by 10-20 % between runs on a shared 2-core machine)."""
    from trimformer.artifact import ModelArtifact
    from trimformer.formats.decoder import DecoderSpec
    from trimformer.runtime.decoding import CachedSession
    from trimformer.runtime.session import cpu_session

    spec = DecoderSpec.from_extras(ModelArtifact.open(out).meta.extras)
    session = CachedSession(cpu_session(out / "model.onnx", threads=threads), spec)
    prompt = np.asarray([[1, 50, 60, 70]], dtype=np.int64)
    runs = []
    for _ in range(repeats):
        logits, state = session.prompt(prompt, np.ones_like(prompt))
        times = []
        for _ in range(500):
            token = np.argmax(logits[:, -1:], axis=-1)
            started = time.perf_counter()
            logits, state = session.step(token, state)
            times.append(time.perf_counter() - started)
        early, late = statistics.median(times[0:100]), statistics.median(times[399:500])
        runs.append(
            {
                "early_ms": round(early * 1e3, 3),
                "late_ms": round(late * 1e3, 3),
                "ratio": round(late / early, 3),
            }
        )
    return {
        "median_step_ms_tokens_1_100": statistics.median(r["early_ms"] for r in runs),
        "median_step_ms_tokens_400_500": statistics.median(r["late_ms"] for r in runs),
        "ratio": statistics.median(r["ratio"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    from trimformer.runtime.cpu import cpu_class, cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/decoder.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--export-only", action="store_true", help="Measure the export alone.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder, onnx_out = Path(scratch) / "smollm-135m-shape", Path(scratch) / "onnx"
        params = _make_model(folder)
        result: dict[str, Any] = {
            "cpu": cpu_name(),
            "cpu_class": cpu_class(),
            "threads": args.threads,
            "parameters": params,
            "fp32_mb": round(params * 4 / 1e6, 1),
            "export": _export(folder, onnx_out, params * 4),
        }
        print(json.dumps(result["export"], indent=2), flush=True)
        if args.export_only:
            print(json.dumps(result, indent=2))
            return
        result["decode"] = _decode_speed(folder, onnx_out, args.threads, args.rounds, args.steps)
        print(json.dumps(result["decode"], indent=2), flush=True)
        result["step_growth"] = _step_growth(onnx_out, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
