"""MatMulNBits' ``accuracy_level`` chosen by token parity and decode speed, never assumed.

The level says what the CPU kernel computes in: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (0:
unset, the kernel's default). Which of them a CPU really has differs (on x86 without fp16 or bf16
compute, levels 0-3 are one fp32 kernel), and int8 activations are fastest but flip greedy tokens
on models with outlier channels (onnxruntime#29849). So for a quantized graph:

1. each level is run on a probe prompt; a level whose logits equal an earlier level's bit for bit
   is the same kernel and is not measured twice (it is reported as ``same_as``);
2. each distinct level's **token agreement** and KL with the float graph are measured on held-out
   prompts (the float graph's greedy continuation fed to both: ``runtime.decoding.fidelity``), and
   its **decode speed** at batch 1 on a 128-token cache (levels interleaved round by round after a
   warm-up, the median);
3. the fastest level whose agreement meets ``min_token_agreement`` is kept; none meeting it is a
   failed gate, with every level's figures in the message.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import onnx

from trimformer.errors import GateFailed
from trimformer.formats.decoder import DecoderSpec
from trimformer.runtime.decoding import CachedSession, fidelities, fidelity
from trimformer.runtime.session import cpu_session

__all__ = ["LEVELS", "choose_accuracy_level", "decode_tokens_per_s", "set_accuracy_level"]

LEVELS = (1, 2, 3, 4)
DECODE_CACHE = 128
DECODE_STEPS = 16
DECODE_ROUNDS = 5


def set_accuracy_level(model: onnx.ModelProto, level: int) -> int:
    """Write ``accuracy_level`` on every MatMulNBits (0 removes it: the kernel's default); the count."""
    count = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
        count += 1
    return count


def _steps_ms(session: CachedSession, state: Any) -> float:
    token = np.asarray([[5]], dtype=np.int64)
    started = time.perf_counter()
    for _ in range(DECODE_STEPS):
        _, state = session.step(token, state)
    return (time.perf_counter() - started) * 1e3


def decode_tokens_per_s(
    sessions: dict[str, CachedSession],
    spec: DecoderSpec,
    rounds: int = DECODE_ROUNDS,
    cache: int = DECODE_CACHE,
) -> dict[str, float]:
    """Batch-1 decode tokens/s of each session on a ``cache``-token cache (less where the context is
    shorter: the steps stay inside it): interleaved round by round after a warm-up (so a slow phase
    of the machine hits every session alike), the median."""
    cache = max(1, min(cache, spec.context_length - DECODE_STEPS))
    ids = np.random.default_rng(0).integers(3, spec.vocab_size, size=(1, cache)).astype(np.int64)
    states = {name: session.prompt(ids, np.ones_like(ids))[1] for name, session in sessions.items()}
    for name, session in sessions.items():
        _steps_ms(session, states[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            times[name].append(_steps_ms(session, states[name]))
    return {name: round(DECODE_STEPS / (statistics.median(t) / 1e3), 1) for name, t in times.items()}


def _distinct_kernels(
    quantized: onnx.ModelProto, spec: DecoderSpec, probe: list[int]
) -> tuple[dict[int, CachedSession], dict[int, int]]:
    """A session per level that computes differently, and for each other level the one it equals."""
    ids = np.asarray([probe], dtype=np.int64)
    sessions: dict[int, CachedSession] = {}
    outputs: dict[int, np.ndarray] = {}
    same_as: dict[int, int] = {}
    for level in LEVELS:
        set_accuracy_level(quantized, level)
        session = CachedSession(cpu_session(quantized), spec)
        logits = session.prompt(ids, np.ones_like(ids))[0]
        twin = next((seen for seen, out in outputs.items() if np.array_equal(out, logits)), None)
        if twin is None:
            sessions[level], outputs[level] = session, logits
        else:
            same_as[level] = twin
    return sessions, same_as


def measure_fidelity(
    quantized: onnx.ModelProto,
    reference: onnx.ModelProto,
    spec: DecoderSpec,
    prompts: list[list[int]],
    new_tokens: int,
) -> dict[str, Any]:
    """Token agreement and KL of one quantized graph with the float graph."""
    model = CachedSession(cpu_session(quantized), spec)
    ref = CachedSession(cpu_session(reference), spec)
    return {**fidelity(model, ref, prompts, new_tokens), "prompts": len(prompts)}


def choose_accuracy_level(
    quantized: onnx.ModelProto,
    reference: onnx.ModelProto,
    spec: DecoderSpec,
    prompts: list[list[int]],
    new_tokens: int,
    min_token_agreement: float,
) -> tuple[int, dict[str, Any]]:
    """The fastest level meeting the agreement floor (written on ``quantized``) and every level's figures."""
    sessions, same_as = _distinct_kernels(quantized, spec, prompts[0])
    ref = CachedSession(cpu_session(reference), spec)
    named = {str(level): session for level, session in sessions.items()}
    figures: dict[str, dict[str, Any]] = dict(fidelities(named, ref, prompts, new_tokens))
    speed = decode_tokens_per_s(named, spec)
    for name, tokens_per_s in speed.items():
        figures[name]["decode_tokens_per_s"] = tokens_per_s
    for level, twin in same_as.items():
        figures[str(level)] = {"same_as": twin}
    meeting = [int(level) for level in speed if figures[level]["token_agreement"] >= min_token_agreement]
    if not meeting:
        measured = "; ".join(f"level {level}: {figures[level]['token_agreement']:.4f}" for level in speed)
        raise GateFailed(
            f"no accuracy_level of the quantized graph keeps token agreement >= {min_token_agreement} "
            f"with the float graph ({measured}); try --weight-only int8, --lm-head int8 or float, a "
            "smaller --block-size, or a lower --min-token-agreement"
        )
    chosen = max(meeting, key=lambda level: speed[str(level)])
    set_accuracy_level(quantized, chosen)
    return chosen, figures
