"""Prompt latency and decode speed of a model-builder folder through onnxruntime-genai's own Generator.

    bench/.venvs/genai/bin/python bench/genai_generator.py FOLDER VOCAB [--threads 2]

Run in the genai venv (``make bench-peers``), not trimformer's: it imports onnxruntime_genai only.
The decoder table (``bench.decoder_table``) measures every graph, the builder's included, with one
harness of its own; this gives the builder's graphs as its users run them, beside that. For a 128-
and a 512-token random prompt: the median over rounds (after one warm-up) of the prompt's time
(``append_tokens``) and of 32 greedy ``generate_next_token`` steps after it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime_genai as og

STEPS = 32
ROUNDS = 5


def _one_run(model: og.Model, ids: np.ndarray) -> tuple[float, float]:
    params = og.GeneratorParams(model)
    # min_length = max_length: random weights may well pick eos, after which steps are no-ops.
    length = ids.shape[1] + STEPS + 1
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(ids)
    prompted = time.perf_counter()
    for _ in range(STEPS):
        generator.generate_next_token()
    if generator.is_done() and generator.token_count() < ids.shape[1] + STEPS:
        raise RuntimeError("the generator stopped before its steps were done")
    return prompted - started, time.perf_counter() - prompted


def measure(folder: str, vocab: int, threads: int) -> dict[str, dict[str, float]]:
    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    result: dict[str, dict[str, float]] = {"prompt_ms": {}, "decode_tokens_per_s": {}}
    for context in (128, 512):
        ids = np.random.default_rng(0).integers(3, vocab, size=(1, context)).astype(np.int32)
        runs = [_one_run(model, ids) for _ in range(ROUNDS + 1)][1:]
        result["prompt_ms"][str(context)] = round(statistics.median(r[0] for r in runs) * 1e3, 1)
        result["decode_tokens_per_s"][str(context)] = round(STEPS / statistics.median(r[1] for r in runs), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("vocab", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.folder, args.vocab, args.threads)))


if __name__ == "__main__":
    main()
