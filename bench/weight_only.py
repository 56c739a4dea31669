"""Weight-only quantization of the built-in causal LM: every variant against its float graph.

    python -m bench.weight_only [--model work/lm-onnx] [--data builtin:tweets] [--rounds 7]

For each variant (round-to-nearest, GPTQ and HQQ int4, int8, the lm_head and the embedding at
other widths, accuracy_level 4; the float graph fused by ``fuse-decoder``, and int4 on top of it),
on the CPU it runs on (stated in the result):

- **size** of the serialized graph (MB);
- **token agreement** and **KL** with the float graph: the float graph's greedy continuation of 32
  tokens after each of 24 test prompts (each test text's first half) is fed to both; agreement is
  the share of positions whose top token is the float graph's (``runtime.decoding.fidelity``, the
  same measure as ``trimformer validate --min-token-agreement``);
- **perplexity** of 16,384 test tokens with a 128-token window (validation's sliding window);
- **decode tokens/s** at batch 1 on top of a 128-token cache: 16 steps a call, variants interleaved
  round by round after a warm-up, medians (``passes.quantize.accuracy_level.decode_tokens_per_s``, the
  measure the pass chooses ``accuracy_level`` by; 2 threads);
- the seconds the quantization took.

Results: ``bench/results/weight_only.json``. Needs ``make lm`` and ``trimformer export work/lm
--out work/lm-onnx``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from tokenizers import Tokenizer

from trimformer.artifact import ModelArtifact
from trimformer.data.calibration import DecoderFeeds
from trimformer.data.datasets import load_dataset
from trimformer.data.prompts import held_out_prompts
from trimformer.formats.decoder import DecoderSpec
from trimformer.passes.fuse.decoder import DecoderFuseConfig, fuse_decoder
from trimformer.passes.quantize.accuracy_level import decode_tokens_per_s
from trimformer.passes.quantize.weight_only import WeightOnlyConfig, weight_only_quantize
from trimformer.runtime.cpu import cpu_class, cpu_name
from trimformer.runtime.decoding import CachedSession, fidelities
from trimformer.runtime.session import cpu_session
from trimformer.validation.decoder import perplexity, text_stream

RESULTS = Path(__file__).parent / "results" / "weight_only.json"
THREADS = 2
VARIANTS: dict[str, dict[str, Any]] = {
    "rtn-int4": {},
    "rtn-int4-asym": {"symmetric": False},
    "rtn-int4-head-int4": {"lm_head": "int4"},
    "rtn-int4-emb-int4": {"embedding": "int4"},
    "rtn-int4-acc4": {"accuracy_level": 4},
    "gptq-int4": {"algo": "gptq"},
    "hqq-int4": {"algo": "hqq"},
    "rtn-int8": {"bits": 8},
    "rtn-int8-acc4": {"bits": 8, "accuracy_level": 4},
}
# On the fused graph (GroupQueryAttention, RotaryEmbedding, SimplifiedLayerNormalization).
FUSED_VARIANTS: dict[str, dict[str, Any]] = {
    "fused-rtn-int4-acc4": {"accuracy_level": 4},
    "fused-rtn-int4-acc4-emb-int4": {"accuracy_level": 4, "embedding": "int4"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="work/lm-onnx")
    parser.add_argument("--data", default="builtin:tweets")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calibration-blocks", type=int, default=128)
    args = parser.parse_args()
    artifact = ModelArtifact.open(args.model)
    spec = DecoderSpec.from_extras(artifact.meta.extras)
    tokenizer = Tokenizer.from_file(str(artifact.path / artifact.meta.tokenizer.file))
    tokenizer.no_truncation()
    prompts = held_out_prompts(tokenizer, spec.context_length, args.data, 24, 64)
    test_texts = list(load_dataset(args.data, split="test").texts)
    stream = text_stream(tokenizer, test_texts, spec.eos_token_ids[0], 16384)
    train = list(load_dataset(args.data, split="train").texts)
    feeds = DecoderFeeds(train, tokenizer, spec, args.calibration_blocks)
    calibration = [f for f in iter(feeds.get_next, None)]
    reference = artifact.load_model()
    fused_model = ir.from_proto(reference)
    fusions = fuse_decoder(fused_model, spec, DecoderFuseConfig())
    fused = ir.to_proto(fused_model)
    graphs: dict[str, onnx.ModelProto] = {"float": reference, "fused": fused}
    rows: dict[str, dict[str, Any]] = {"float": {"settings": None}, "fused": {"fusions": fusions}}
    for name, settings in VARIANTS.items():
        config = WeightOnlyConfig(**{"accuracy_level": 0, **settings})
        started = time.perf_counter()
        graphs[name], _ = weight_only_quantize(reference, config, calibration)
        rows[name] = {"settings": config.settings(), "quantize_s": round(time.perf_counter() - started, 2)}
        print(f"{name}: quantized in {rows[name]['quantize_s']} s", flush=True)
    for name, settings in FUSED_VARIANTS.items():
        config = WeightOnlyConfig(**settings)
        graphs[name], _ = weight_only_quantize(fused, config, calibration)
        rows[name] = {"settings": config.settings(), "fused": True}
    sessions = {name: CachedSession(cpu_session(g, threads=THREADS), spec) for name, g in graphs.items()}
    for name, session in sessions.items():
        rows[name]["size_mb"] = round(graphs[name].ByteSize() / 1e6, 3)
        rows[name]["perplexity_128"] = round(perplexity(session, stream, 128), 3)
    quantized = {name: session for name, session in sessions.items() if name != "float"}
    for name, figures in fidelities(quantized, sessions["float"], prompts, 32).items():
        rows[name].update(figures)
    speed = decode_tokens_per_s(sessions, spec, rounds=args.rounds)
    for name in rows:
        rows[name]["decode_tokens_per_s_128"] = speed[name]
        rows[name]["decode_vs_float"] = round(speed[name] / speed["float"], 3)
    result = {
        "cpu": cpu_name(),
        "cpu_class": cpu_class(),
        "threads": THREADS,
        "model": str(args.model),
        "prompts": len(prompts),
        "perplexity_tokens": len(stream),
        "variants": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{'variant':30} {'MB':>7} {'agree':>7} {'KL':>9} {'ppl':>8} {'tok/s':>7} {'x float':>7}")
    for name, r in rows.items():
        print(
            f"{name:30} {r['size_mb']:7.2f} {r.get('token_agreement', 1.0):7.4f} {r.get('kl', 0.0):9.5f} "
            f"{r['perplexity_128']:8.3f} {r['decode_tokens_per_s_128']:7.1f} {r['decode_vs_float']:7.3f}"
        )
    print(f"written {RESULTS} ({cpu_name()}, {cpu_class()})")


if __name__ == "__main__":
    main()
