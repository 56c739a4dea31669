"""The decoder table: trimformer's decoder variants beside PyTorch and onnxruntime-genai's model builder.

    python -m bench.decoder_table [--lm work/lm] [--smollm] [--work work/bench-decoder]

Rows, produced from the same weights: PyTorch eager fp32; trimformer fp32 (the export), fused
(``trimformer fuse``), weight-only int8 and int4 (RTN and GPTQ; accuracy level chosen by the pass;
RTN again with the builder's int4 layout, ``--lm-head int4 --embedding int4``);
the model builder's fp32 and int4 (``python -m onnxruntime_genai.models.builder -i HF -o OUT -p
int4 -e cpu``, run in its own venv ``bench/.venvs/genai``, ``make bench-peers``). Every ONNX row is
measured by the same harness in one process with the same threads (``validation.decoder``:
onnxruntime sessions stepping the KV cache; the builder's graphs take no ``position_ids`` and are fed
without it): perplexity (128-token window, the test split), greedy-token agreement and KL with the
PyTorch model (24 test prompts x 32 tokens), prompt ms at 1x128, decode tokens/s at a 128- and a
512-token cache, file size, the producing command's seconds and peak memory. The harness keeps the
cache in place where the graph allows (GroupQueryAttention: the fused rows and the builder's), as
onnxruntime-genai does; the builder's rows also get the same figures through onnxruntime-genai's own
Generator (``bench.genai_generator``, in its venv).

``--smollm`` adds the speed table on a SmolLM-135M-shaped Llama with random weights (config in
``bench.decoder``): no quality figures there (random weights have none to lose).
Results: ``bench/results/decoder_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trimformer.artifact import ModelArtifact
from trimformer.formats.decoder import CACHE_IN_PLACE_KEY, DecoderSpec
from trimformer.runtime.cpu import cpu_class, cpu_name
from trimformer.validation.decoder import (
    DecoderValidateConfig,
    graph_decoder,
    measure_decoder,
    prompt_token_rows,
)

RESULTS = Path(__file__).parent / "results" / "decoder_table.json"
GENAI_PYTHON = Path(__file__).parent / ".venvs" / "genai" / "bin" / "python"
TF = [sys.executable, "-m", "trimformer", "--quiet"]
THREADS = 2


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Run a producing command; (seconds, that process's peak RSS in MB, from its own rusage)."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, cmd)
    return round(time.perf_counter() - started, 1), round(usage.ru_maxrss / 1024, 1)


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6, 2)


def produce(hf: Path, work: Path, gptq: bool) -> dict[str, dict[str, Any]]:
    """Every variant's folder, with the seconds and peak memory it took to make."""
    rows: dict[str, dict[str, Any]] = {}
    fp32 = work / "trimformer-fp32"
    steps = {
        "trimformer-fp32": [*TF, "export", str(hf), "--out", str(fp32), "--overwrite"],
        "trimformer-fused": [*TF, "fuse", str(fp32), "--out", str(work / "trimformer-fused"), "--overwrite"],
        "trimformer-int8": [*TF, "quantize", str(work / "trimformer-fused"), "--weight-only", "int8"],
        "trimformer-int4-rtn": [*TF, "quantize", str(work / "trimformer-fused"), "--weight-only", "int4"],
    }
    # The builder's int4 layout: lm_head at 4 bits and the (tied) table read from its blocks.
    steps["trimformer-int4-rtn-head4"] = [
        *steps["trimformer-int4-rtn"],
        "--lm-head",
        "int4",
        "--embedding",
        "int4",
    ]
    if gptq:
        steps["trimformer-int4-gptq"] = [
            *steps["trimformer-int4-rtn"],
            "--algo",
            "gptq",
            "--calibration",
            "builtin:tweets",
        ]
    for name, cmd in steps.items():
        if name.startswith("trimformer-int"):
            cmd = [
                *cmd,
                "--prompts",
                "builtin:tweets",
                "--min-token-agreement",
                "0",
                "--out",
                str(work / name),
                "--overwrite",
            ]
        seconds, peak = _timed(cmd)
        rows[name] = {"folder": str(work / name), "seconds": seconds, "peak_mb": peak}
        print(f"{name}: {seconds} s", flush=True)
    for precision in ("fp32", "int4"):
        name, out = f"builder-{precision}", work / f"builder-{precision}"
        cmd = [str(GENAI_PYTHON), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
        seconds, peak = _timed([*cmd, "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache")])
        rows[name] = {"folder": str(out), "seconds": seconds, "peak_mb": peak}
        print(f"{name}: {seconds} s", flush=True)
    return rows


def _in_place(name: str, folder: Path) -> bool:
    """Whether the harness keeps the cache in place: where the fused artifact says its attention can
    (trimformer's rows) and for the builder's graphs (GroupQueryAttention, which onnxruntime-genai
    runs with past_present_share_buffer)."""
    if name.startswith("builder"):
        return True
    return bool(ModelArtifact.open(folder).meta.extras.get(CACHE_IN_PLACE_KEY))


def genai_generator(folder: Path, vocab: int) -> dict[str, Any]:
    """The builder's graph as its users run it: onnxruntime-genai's Generator (bench.genai_generator)."""
    script = Path(__file__).parent / "genai_generator.py"
    out = subprocess.run(
        [str(GENAI_PYTHON), str(script), str(folder), str(vocab), "--threads", str(THREADS)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(rows: dict[str, dict[str, Any]], hf: Path, quality: bool, spec: DecoderSpec) -> None:
    from tokenizers import Tokenizer

    from trimformer.data import load_dataset
    from trimformer.pipeline.stages.validate import open_decoder_reference
    from trimformer.runtime.decoding import fidelity

    texts = list(load_dataset("builtin:tweets", split="test").texts)
    tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
    tokenizer.no_truncation()
    config = DecoderValidateConfig(
        perplexity_context=128, perplexity_tokens=16384 if quality else 256, runs=10
    )
    torch_runner = open_decoder_reference(str(hf), THREADS)
    prompts = prompt_token_rows(tokenizer, texts, 24, 64)
    report = measure_decoder(torch_runner, tokenizer, texts, config, None)
    rows["pytorch-fp32"] = {"seconds": None, "peak_mb": None, **report}
    for name, row in rows.items():
        if name == "pytorch-fp32":
            continue
        folder = Path(row["folder"])
        runner = graph_decoder(name, folder / "model.onnx", spec, THREADS, _in_place(name, folder))
        row.update(measure_decoder(runner, tokenizer, texts, config, _size_mb(folder)))
        if name.startswith("builder"):
            row["generator"] = genai_generator(folder, spec.vocab_size)
        if quality:
            row.update(fidelity(runner, torch_runner, prompts, 32))
        print(f"{name}: measured", flush=True)


PLOT = Path(__file__).parents[1] / "docs" / "bench_decoder.png"


def plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """Decode tokens/s at a 128-token cache per variant, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = result["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], tables.items(), strict=True):
        names = list(rows)
        speeds = [rows[n].get("decode_tokens_per_s", {}).get("128", 0) for n in names]
        colors = [
            "#888" if n.startswith("pytorch") else "#c44" if n.startswith("builder") else "#36c"
            for n in names
        ]
        ax.barh(names, speeds, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s, batch 1, 128-token cache")
        ax.set_title(f"{title} ({result['cpu']}, {result['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm", default="work/lm")
    parser.add_argument("--work", default="work/bench-decoder")
    parser.add_argument("--smollm", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the last result")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(RESULTS.read_text(encoding="utf-8")))
        return
    tables: dict[str, Any] = {}
    models = [("built-in LM", Path(args.lm), True)]
    if args.smollm:
        from bench.decoder import _make_model  # the SmolLM-135M shape, random weights

        smol = Path(args.work) / "smollm-hf"
        if not (smol / "config.json").is_file():
            _make_model(smol)
        models.append(("SmolLM-135M shape", smol, False))
    for title, hf, quality in models:
        work = Path(args.work) / hf.name
        work.mkdir(parents=True, exist_ok=True)
        rows = produce(hf, work, gptq=quality)
        spec = DecoderSpec.from_extras(ModelArtifact.open(work / "trimformer-fp32").meta.extras)
        measure(rows, hf, quality, spec)
        tables[title] = rows
    result = {"cpu": cpu_name(), "cpu_class": cpu_class(), "threads": THREADS, "tables": tables}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    plot(result)
    for title, rows in tables.items():
        print(f"\n{title} ({cpu_name()}, {THREADS} threads)")
        print(
            f"{'variant':22} {'MB':>7} {'ppl':>8} {'agree':>7} {'prompt':>7} {'tok/s128':>9} {'tok/s512':>9} {'s':>6}"
        )
        for name, r in rows.items():
            speed = r.get("decode_tokens_per_s", {})
            print(
                f"{name:22} {r.get('size_mb') or 0:7.2f} {r.get('perplexity', 0):8.3f} "
                f"{r.get('token_agreement', float('nan')):7.4f} {r.get('prompt_latency_ms', 0):7.2f} "
                f"{speed.get('128', 0):9.1f} {speed.get('512', 0):9.1f} {r.get('seconds') or 0:6.1f}"
            )
            if "generator" in r:  # the same graph through onnxruntime-genai's Generator
                gen = r["generator"]
                print(
                    f"{'  (genai Generator)':22} {'':7} {'':8} {'':7} {gen['prompt_ms']['128']:7.2f} "
                    f"{gen['decode_tokens_per_s']['128']:9.1f} {gen['decode_tokens_per_s']['512']:9.1f}"
                )
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
