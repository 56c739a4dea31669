"""Interleaved decode A/B of decoder graphs, and the same graphs under onnxruntime-genai's Generator.

    python -m bench.decoder_ab --spec work/bench-decoder/smollm-hf/trimformer-fp32 \\
        ours=work/bench-decoder/smollm-hf/trimformer-int4-rtn-head4 builder=work/bench-decoder/smollm-hf/builder-int4 \\
        [--genai builder=work/bench-decoder/smollm-hf/builder-int4 ours=work/bench-decoder/smollm-hf/trimformer-int4-rtn-head4] \\
        [--rounds 15] [--repeats 3]

The decoder table measures its rows one after another, and a 2-core machine's speed drifts by tens of
percent over minutes; this gives the figures to compare. Graphs (``NAME=FOLDER``, each ``model.onnx``
of the cache contract ``--spec``'s artifact states) are stepped by trimformer's harness with the cache
kept in place, in one process, round by round (``decode_tokens_per_s``: 16 steps a round, median) at a
128- and a 512-token cache.

``--genai`` folders run under onnxruntime-genai's own Generator (``bench/genai_generator.py`` in
``bench/.venvs/genai``): the builder's as they are, trimformer artifacts packaged first (the bundle
carries a ``genai_config.json``). They alternate with the graphs run by trimformer's runtime,
``--repeats`` times: prompt 1x128 ms and decode tokens/s, medians of the repeats, and each row's
ratio to the first ``--genai`` row, repeat by repeat. Every one of these measurements runs in a
process of its own, as a user's would: onnxruntime sessions that share a process share its two cores
with each other's idle, spinning thread pools.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.decoder_table import TF, THREADS, genai_generator
from trimformer.artifact import ModelArtifact
from trimformer.formats.decoder import GENAI_CONFIG_FILE, DecoderSpec
from trimformer.passes.quantize.accuracy_level import decode_tokens_per_s
from trimformer.runtime.cpu import cpu_name
from trimformer.runtime.decoding import CachedSession
from trimformer.runtime.session import cpu_session
from trimformer.validation.decoder import graph_decoder, speed


def _pairs(values: list[str]) -> dict[str, Path]:
    return {name: Path(folder) for name, _, folder in (v.partition("=") for v in values)}


def interleaved(graphs: dict[str, Path], spec: DecoderSpec, rounds: int) -> dict[str, dict[str, float]]:
    sessions = {
        name: CachedSession(cpu_session(folder / "model.onnx", threads=THREADS), spec, in_place=True)
        for name, folder in graphs.items()
    }
    out: dict[str, dict[str, float]] = {name: {} for name in graphs}
    for cache in (128, 512):
        for name, tps in decode_tokens_per_s(sessions, spec, rounds=rounds, cache=cache).items():
            out[name][str(cache)] = tps
    return out


def genai_folder(folder: Path) -> Path:
    """A folder onnxruntime-genai opens: the builder's as it is; a trimformer artifact packaged
    (``trimformer package``: the bundle carries its ``genai_config.json``), afresh each run."""
    if (folder / GENAI_CONFIG_FILE).is_file():
        return folder
    bundle = folder.with_name(f"{folder.name}-bundle")
    subprocess.run([*TF, "package", str(folder), "--out", str(bundle), "--overwrite"], check=True)
    return bundle


def _generator(folder: Path, vocab: int) -> tuple[float, float, float]:
    got = genai_generator(folder, vocab)
    return got["prompt_ms"]["128"], got["decode_tokens_per_s"]["128"], got["decode_tokens_per_s"]["512"]


def _trimformer(spec_folder: str, folder: Path) -> tuple[float, float, float]:
    """One graph through trimformer's runtime (cache in place), in a process of its own."""
    cmd = [sys.executable, "-m", "bench.decoder_ab", "--spec", spec_folder, "--one", f"graph={folder}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    prompt, at128, at512 = json.loads(out.strip().splitlines()[-1])
    return prompt, at128, at512


def _one(spec: DecoderSpec, folder: Path) -> None:
    got = speed(graph_decoder("graph", folder / "model.onnx", spec, THREADS, in_place=True), runs=10)
    tps = got["decode_tokens_per_s"]
    print(json.dumps([got["prompt_latency_ms"], tps["128"], tps["512"]]))


def against_generator(
    graphs: dict[str, Path], genai: dict[str, Path], spec_folder: str, vocab: int, repeats: int
) -> dict[str, list[tuple[float, float, float]]]:
    jobs: list[tuple[str, Callable[[], tuple[float, float, float]]]] = [
        (f"{name} (genai Generator)", partial(_generator, genai_folder(folder), vocab))
        for name, folder in genai.items()
    ] + [(name, partial(_trimformer, spec_folder, folder)) for name, folder in graphs.items()]
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in jobs}
    for repeat in range(repeats):
        # Every other repeat in reverse order: no row always runs first (or after the same row).
        for name, job in jobs if repeat % 2 == 0 else jobs[::-1]:
            runs[name].append(job())
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--spec", required=True, help="a trimformer artifact of the same model (its cache contract)"
    )
    parser.add_argument("graphs", nargs="*", help="NAME=FOLDER")
    parser.add_argument(
        "--genai",
        nargs="*",
        default=[],
        help="NAME=FOLDER run by genai's Generator (builder's or trimformer's)",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one graph's figures as JSON
    args = parser.parse_args()
    spec = DecoderSpec.from_extras(ModelArtifact.open(args.spec).meta.extras)
    if args.one:
        _one(spec, _pairs([args.one])["graph"])
        return
    graphs = _pairs(args.graphs)
    print(f"{cpu_name()}, {THREADS} threads; decode tokens/s, interleaved rounds, the cache in place")
    for name, tps in interleaved(graphs, spec, args.rounds).items():
        print(f"  {name:32} @128 {tps['128']:7.1f}  @512 {tps['512']:7.1f}")
    if args.genai:
        print("alternating with onnxruntime-genai's Generator (medians of the repeats)")
        runs_by_name = against_generator(graphs, _pairs(args.genai), args.spec, spec.vocab_size, args.repeats)
        for name, runs in runs_by_name.items():
            prompt, at128, at512 = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"  {name:32} prompt {prompt:7.1f} ms  @128 {at128:7.1f}  @512 {at512:7.1f}")
        reference = next(iter(runs_by_name))
        print(f"against {reference}, repeat by repeat (medians): prompt ms and tokens/s ratios")
        for name, prompt, at128, at512 in paired_ratios(runs_by_name, reference):
            print(f"  {name:32} prompt {prompt:5.2f}x  @128 {at128:5.2f}x  @512 {at512:5.2f}x")


def paired_ratios(
    runs: dict[str, list[tuple[float, float, float]]], reference: str
) -> list[tuple[str, float, float, float]]:
    """Each row against ``reference``, as the median of the ratios of runs made one after the other
    (the machine's drift cancels within a repeat, not across)."""
    out = []
    for name in (n for n in runs if n != reference):
        pairs = list(zip(runs[name], runs[reference], strict=True))
        out.append((name, *(statistics.median(a[i] / b[i] for a, b in pairs) for i in range(3))))
    return out


if __name__ == "__main__":
    main()
