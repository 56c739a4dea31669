"""Interleaved decode A/B of decoder graphs, and the model builder's graphs under onnxruntime-genai's Generator.

    python -m bench.decoder_ab --spec work/bench-decoder/smollm-hf/trimformer-fp32 \\
        ours=work/bench-decoder/smollm-hf/trimformer-int4-rtn-head4 builder=work/bench-decoder/smollm-hf/builder-int4 \\
        [--genai builder=work/bench-decoder/smollm-hf/builder-int4] [--rounds 15] [--repeats 3]

The decoder table measures its rows one after another, and a 2-core machine's speed drifts by tens of
percent over minutes; this gives the figures to compare. Graphs (``NAME=FOLDER``, each ``model.onnx``
of the cache contract ``--spec``'s artifact states) are stepped by trimformer's harness with the cache
kept in place, in one process, round by round (``decode_tokens_per_s``: 16 steps a round, median) at a
128- and a 512-token cache. ``--genai`` folders (the builder's) also run under onnxruntime-genai's own
Generator (``bench/genai_generator.py`` in ``bench/.venvs/genai``), alternating with trimformer's
harness ``--repeats`` times: prompt 1x128 ms and decode tokens/s, medians of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.decoder_table import THREADS, genai_generator
from trimformer.artifact import ModelArtifact
from trimformer.formats.decoder import DecoderSpec
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


def _generator(folder: Path, vocab: int) -> tuple[float, float, float]:
    got = genai_generator(folder, vocab)
    return got["prompt_ms"]["128"], got["decode_tokens_per_s"]["128"], got["decode_tokens_per_s"]["512"]


def against_generator(
    graphs: dict[str, Path], genai: dict[str, Path], spec: DecoderSpec, repeats: int
) -> dict[str, list[tuple[float, float, float]]]:
    runners = {n: graph_decoder(n, f / "model.onnx", spec, THREADS, in_place=True) for n, f in graphs.items()}
    runs: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(repeats):
        for name, folder in genai.items():
            runs.setdefault(f"{name} (genai Generator)", []).append(_generator(folder, spec.vocab_size))
        for name, runner in runners.items():
            got = speed(runner, runs=10)
            tps = got["decode_tokens_per_s"]
            runs.setdefault(name, []).append((got["prompt_latency_ms"], tps["128"], tps["512"]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--spec", required=True, help="a trimformer artifact of the same model (its cache contract)"
    )
    parser.add_argument("graphs", nargs="+", help="NAME=FOLDER")
    parser.add_argument("--genai", nargs="*", default=[], help="NAME=FOLDER of the builder's graphs")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = DecoderSpec.from_extras(ModelArtifact.open(args.spec).meta.extras)
    graphs = _pairs(args.graphs)
    print(f"{cpu_name()}, {THREADS} threads; decode tokens/s, interleaved rounds, the cache in place")
    for name, tps in interleaved(graphs, spec, args.rounds).items():
        print(f"  {name:32} @128 {tps['128']:7.1f}  @512 {tps['512']:7.1f}")
    if args.genai:
        print("alternating with onnxruntime-genai's Generator (medians of the repeats)")
        for name, runs in against_generator(graphs, _pairs(args.genai), spec, args.repeats).items():
            prompt, at128, at512 = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"  {name:32} prompt {prompt:7.1f} ms  @128 {at128:7.1f}  @512 {at512:7.1f}")


if __name__ == "__main__":
    main()
