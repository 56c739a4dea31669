"""Validation of a causal LM: perplexity, fidelity to a reference, prompt and decode speed, gates.

The model is a decoder artifact run by onnxruntime through its KV cache
(:class:`~trimformer.runtime.decoding.CachedSession`); the reference is another decoder artifact
or, through the caller's opener, the PyTorch folder. Both are measured in this process with the
same threads. What report.json gains for decoders (documented in the README):

- ``perplexity``: exp of the mean next-token loss over the test text, framed as in training
  (``<s> text </s>`` concatenated), scored with a sliding window of ``perplexity_context`` tokens and
  a stride of half of it (each token is scored once, with at least half a window of left context);
- ``token_agreement``: over ``prompts`` test prompts, the reference's greedy continuation of
  ``new_tokens`` tokens is fed to both models, and this is the share of those positions where the
  model's top token equals the reference's; ``kl``: the mean per-token KL(reference || model) there;
- ``prompt_latency_ms``: p50 of the prompt pass at batch 1 x 128 tokens; ``time_to_first_token_ms``:
  p50 of the prompt pass plus choosing the first token;
- ``decode_tokens_per_s``: at batch 1, ``{"128": ..., "512": ...}``: steps per second on top of a
  cache of that many tokens (contexts the model cannot hold are left out);
- ``peak_memory_mb``, ``size_mb``; with a reference, the same figures under ``reference``,
  ``perplexity_increase_pct`` and ``decode_speedup`` (model / reference tokens/s at each context).

Gates: ``max_perplexity_increase`` (percent), ``min_token_agreement`` (a share in [0, 1]) and
``min_decode_speedup`` (at every measured context).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trimformer.artifact import ModelArtifact
from trimformer.data import load_dataset
from trimformer.data.prompts import first_halves
from trimformer.errors import UserError
from trimformer.formats.decoder import CACHE_IN_PLACE_KEY, DecoderSpec
from trimformer.runtime.decoding import CachedSession, fidelity, full_pass, log_softmax
from trimformer.runtime.session import cpu_session
from trimformer.validation.latency import PeakMemory

__all__ = [
    "DecoderOpener",
    "DecoderRunner",
    "DecoderValidateConfig",
    "graph_decoder",
    "measure_decoder",
    "onnx_decoder",
    "prompt_token_rows",
    "validate_decoder",
]

DECODE_CONTEXTS = (128, 512)
PROMPT_TOKENS = 128


class DecoderRunner(Protocol):
    """What validation needs of a decoder: a prompt pass and cached steps, numpy in and out."""

    name: str
    spec: DecoderSpec

    def prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, Any]: ...

    def step(self, next_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


@dataclass
class _OnnxDecoder:
    name: str
    spec: DecoderSpec
    session: CachedSession

    def prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, Any]:
        return self.session.prompt(ids, mask)

    def step(self, next_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        return self.session.step(next_ids, state)


def onnx_decoder(artifact: ModelArtifact, threads: int) -> DecoderRunner:
    spec = DecoderSpec.from_extras(artifact.meta.extras, str(artifact.path))
    in_place = bool(artifact.meta.extras.get(CACHE_IN_PLACE_KEY))
    return graph_decoder(str(artifact.path), artifact.model_path, spec, threads, in_place)


def graph_decoder(
    name: str, model: Path, spec: DecoderSpec, threads: int, in_place: bool = False
) -> DecoderRunner:
    """Any decoder graph of the cache contract ``spec`` states (one that derives positions from the
    attention mask too, such as onnxruntime-genai's builder's), stepped by this harness; ``in_place``:
    its cache kept in one buffer per layer (GroupQueryAttention graphs, see CachedSession)."""
    session = CachedSession(cpu_session(model, threads=threads), spec, in_place=in_place)
    return _OnnxDecoder(name, spec, session)


@dataclass
class DecoderValidateConfig:
    """The decoder-specific settings of ``trimformer validate`` (the shared ones stay in ValidateConfig)."""

    perplexity_context: int | None = None  # None: min(512, the model's context)
    perplexity_tokens: int = 16384
    prompts: int = 20
    new_tokens: int = 32
    runs: int = 10
    max_perplexity_increase: float | None = None
    min_token_agreement: float | None = None
    min_decode_speedup: float | None = None

    def check(self, has_reference: bool) -> None:
        checks = [
            (self.perplexity_context is None or self.perplexity_context >= 2, "--perplexity-context must be at least 2"),
            (self.perplexity_tokens >= 2, "--perplexity-tokens must be at least 2"),
            (self.prompts >= 1 and self.new_tokens >= 1, "--prompts and --new-tokens must be at least 1"),
            (self.min_token_agreement is None or 0 <= self.min_token_agreement <= 1,
             f"--min-token-agreement is a share in [0, 1], got {self.min_token_agreement}"),
            (self.max_perplexity_increase is None or self.max_perplexity_increase >= 0,
             f"--max-perplexity-increase must be at least 0 percent, got {self.max_perplexity_increase}"),
            (self.min_decode_speedup is None or self.min_decode_speedup > 0,
             f"--min-decode-speedup must be positive, got {self.min_decode_speedup}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        gates = (self.max_perplexity_increase, self.min_token_agreement, self.min_decode_speedup)
        if any(g is not None for g in gates) and not has_reference:
            raise UserError(
                "--max-perplexity-increase, --min-token-agreement and --min-decode-speedup compare "
                "against a reference; pass --reference"
            )


def text_stream(tokenizer: Any, texts: list[str], eos: int | None, limit: int) -> np.ndarray:
    """``<s> text </s>`` for each text (the tokenizer adds what it adds), concatenated, at most ``limit``."""
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        stream.extend(encoding.ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= limit:
            break
    return np.asarray(stream[:limit], dtype=np.int64)


def perplexity(runner: DecoderRunner, stream: np.ndarray, window: int) -> float:
    """Sliding-window perplexity: windows of ``window`` tokens, stride ``window // 2``."""
    stride = max(1, window // 2)
    total, count, scored_to = 0.0, 0, 1  # position 0 has no left context
    for start in range(0, max(1, len(stream) - 1), stride):
        chunk = stream[start : start + window]
        if len(chunk) < 2:
            break
        log_probs = log_softmax(full_pass(runner, chunk)[:-1])
        targets = chunk[1:]
        positions = np.arange(start + 1, start + len(chunk))
        new = positions >= scored_to
        total -= float(log_probs[np.arange(len(targets)), targets][new].sum())
        count += int(new.sum())
        scored_to = start + len(chunk)
        if start + window >= len(stream):
            break
    return float(np.exp(total / max(count, 1)))


def _p50_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 3)


def speed(runner: DecoderRunner, runs: int, steps: int = 32, seed: int = 0) -> dict[str, Any]:
    """Prompt latency and time to first token at 1 x 128, decode tokens/s at 128 and 512."""
    context = runner.spec.context_length
    rng = np.random.default_rng(seed)
    vocab = runner.spec.vocab_size
    out: dict[str, Any] = {"decode_tokens_per_s": {}}
    prompt_len = min(PROMPT_TOKENS, context - 1)
    ids = rng.integers(3, vocab, size=(1, prompt_len)).astype(np.int64)
    mask = np.ones_like(ids)
    out["prompt_tokens"] = prompt_len
    out["prompt_latency_ms"] = _p50_ms(lambda: runner.prompt(ids, mask), runs)
    out["time_to_first_token_ms"] = _p50_ms(lambda: int(np.argmax(runner.prompt(ids, mask)[0][0, -1])), runs)
    for ctx in DECODE_CONTEXTS:
        if ctx + steps > context:
            continue
        cache_ids = rng.integers(3, vocab, size=(1, ctx)).astype(np.int64)
        _, state = runner.prompt(cache_ids, np.ones_like(cache_ids))

        def decode(state: Any = state) -> None:
            token = np.asarray([[5]], dtype=np.int64)
            for _ in range(steps):
                _, state = runner.step(token, state)

        ms = _p50_ms(decode, max(3, runs // 2))
        out["decode_tokens_per_s"][str(ctx)] = round(steps / (ms / 1e3), 2)
    return out


def prompt_token_rows(tokenizer: Any, texts: list[str], count: int, longest: int) -> list[list[int]]:
    """Prompts from held-out texts (:func:`trimformer.data.prompts.first_halves`); none is an error."""
    rows = first_halves(tokenizer, texts, count, longest)
    if not rows:
        raise UserError("the validation texts give no prompts; give texts with at least one token")
    return rows


def measure_decoder(
    runner: DecoderRunner,
    tokenizer: Any,
    texts: list[str],
    config: DecoderValidateConfig,
    size_mb: float | None,
) -> dict[str, Any]:
    """Perplexity and speed of one decoder (model or reference), with its peak memory."""
    spec = runner.spec
    window = config.perplexity_context or min(512, spec.context_length)
    if window > spec.context_length:
        raise UserError(f"--perplexity-context {window} exceeds the model's context of {spec.context_length}")
    eos = spec.eos_token_ids[0] if spec.eos_token_ids else None
    stream = text_stream(tokenizer, texts, eos, config.perplexity_tokens)
    with PeakMemory() as memory:
        report: dict[str, Any] = {
            "model": runner.name,
            "size_mb": size_mb,
            "perplexity": round(perplexity(runner, stream, window), 4),
            "perplexity_context": window,
            "perplexity_tokens": len(stream),
        }
        report.update(speed(runner, config.runs))
    report["peak_memory_mb"] = memory.peak_mb
    return report


def compare_and_gate(
    report: dict[str, Any],
    ref: dict[str, Any] | None,
    agreement: dict[str, float] | None,
    config: DecoderValidateConfig,
) -> dict[str, Any]:
    """Adds the comparisons to ``report`` and returns the gates' verdict."""
    failed: list[str] = []
    report["reference"] = ref
    if ref is None:
        report["gates"] = {"passed": True, "failed": []}
        return report["gates"]
    report.update(agreement or {})
    increase = round((report["perplexity"] / ref["perplexity"] - 1.0) * 100.0, 4)
    report["perplexity_increase_pct"] = increase
    speedup = {
        ctx: round(tps / ref["decode_tokens_per_s"][ctx], 3)
        for ctx, tps in report["decode_tokens_per_s"].items()
        if ref["decode_tokens_per_s"].get(ctx)
    }
    report["decode_speedup"] = speedup
    if config.max_perplexity_increase is not None and increase > config.max_perplexity_increase:
        failed.append(
            f"max_perplexity_increase: perplexity rose {increase:.2f} % (limit {config.max_perplexity_increase:.2f} %)"
        )
    if config.min_token_agreement is not None and report["token_agreement"] < config.min_token_agreement:
        failed.append(
            f"min_token_agreement: {report['token_agreement']:.4f} of greedy tokens agree (needs {config.min_token_agreement:.4f})"
        )
    if config.min_decode_speedup is not None:
        failed += [
            f"min_decode_speedup: {value:.2f}x at context {ctx} (needs {config.min_decode_speedup:.2f}x)"
            for ctx, value in speedup.items()
            if value < config.min_decode_speedup
        ]
    report["gates"] = {"passed": not failed, "failed": failed}
    return report["gates"]


def decoder_texts(data: str, split: str, seed: int, text_column: str | None, limit: int | None) -> list[str]:
    dataset = load_dataset(data, split=split, seed=seed, text_column=text_column, limit=limit)
    return list(dataset.texts)


# Opens a reference that is not an artifact folder (the PyTorch source): (spec, threads) -> runner.
DecoderOpener = Callable[[str, int], DecoderRunner]


def _open_reference(
    spec: str, threads: int, opener: DecoderOpener | None
) -> tuple[DecoderRunner, float | None]:
    from trimformer.artifact import ARTIFACT_META

    if (Path(spec) / ARTIFACT_META).is_file():
        artifact = ModelArtifact.open(spec)
        if artifact.task != "causal-lm":
            raise UserError(f"the reference {spec} is a {artifact.task} model but the model is a causal LM")
        return onnx_decoder(artifact, threads), round(artifact.size_bytes() / 1e6, 3)
    if opener is None:
        raise UserError(f"the reference {spec} is not an artifact folder; give an exported decoder")
    return opener(spec, threads), None


def validate_decoder(
    artifact: ModelArtifact,
    texts: list[str],
    config: DecoderValidateConfig,
    reference: str | None,
    threads: int,
    opener: DecoderOpener | None,
) -> dict[str, Any]:
    """The decoder report (see the module docstring); the caller writes it and applies the verdict."""
    from tokenizers import Tokenizer

    config.check(reference is not None)
    tokenizer = Tokenizer.from_file(str(artifact.path / artifact.meta.tokenizer.file))
    tokenizer.no_truncation()
    model = onnx_decoder(artifact, threads)
    report = measure_decoder(model, tokenizer, texts, config, round(artifact.size_bytes() / 1e6, 3))
    report["task"] = "causal-lm"
    ref_report, agreement = None, None
    if reference is not None:
        runner, size_mb = _open_reference(reference, threads, opener)
        if runner.spec.vocab_size != model.spec.vocab_size:
            raise UserError(
                f"the reference has {runner.spec.vocab_size} tokens but the model {model.spec.vocab_size}; "
                "compare models that share a tokenizer"
            )
        ref_report = measure_decoder(runner, tokenizer, texts, config, size_mb)
        longest = max(2, min(64, model.spec.context_length - config.new_tokens - 1))
        prompts = prompt_token_rows(tokenizer, texts, config.prompts, longest)
        agreement = {**fidelity(model, runner, prompts, config.new_tokens), "prompts": len(prompts)}
    compare_and_gate(report, ref_report, agreement, config)
    return report
