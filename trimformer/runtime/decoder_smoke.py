"""A decoder bundle's smoke record: greedy tokens of fixed prompts, re-checked wherever it is opened.

An encoder bundle records its outputs on a few texts; a decoder's output that matters is the text it
generates, and that goes through the cache path (prompt pass, then one token a step). So packaging
walks greedy decoding over :data:`SMOKE_PROMPTS` and records each new token and its logit. A service
that opens the bundle walks again, feeding the *recorded* tokens (teacher forcing, so one early
difference cannot cascade into noise), and requires at every step:

- the recorded token is the argmax, or within ``atol`` of it (a tie at the tolerance is not a
  regression: integer kernels differ between CPUs by about that much);
- its logit is within ``atol`` of the recorded one.

numpy only; the stepper is a :class:`~trimformer.runtime.decoding.CachedSession`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from trimformer.runtime.bundle import BundleError
from trimformer.runtime.decoding import Stepper

__all__ = ["SMOKE_NEW_TOKENS", "SMOKE_PROMPTS", "check_decoder_smoke", "record_decoder_smoke"]

SMOKE_PROMPTS = (
    "i love this new phone, the camera is",
    "the weather today is",
    "can't believe the game last night",
    "Der Zug hat heute wieder",
)
SMOKE_NEW_TOKENS = 8
SMOKE_KIND = "greedy-tokens"

Encode = Callable[[str], list[int]]


def _walk(
    stepper: Stepper, prompt_ids: Sequence[int], feed: Sequence[int] | None, steps: int
) -> Iterator[np.ndarray]:
    """Each step's last-position logits [vocab]; after each, feed ``feed[i]`` (or the argmax)."""
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    logits, state = stepper.prompt(ids, np.ones_like(ids))
    for index in range(steps):
        row = np.asarray(logits[0, -1], dtype=np.float64)
        yield row
        if index + 1 < steps:
            token = int(np.argmax(row)) if feed is None else int(feed[index])
            logits, state = stepper.step(np.asarray([[token]], dtype=np.int64), state)


def record_decoder_smoke(stepper: Stepper, encode: Encode, atol_per_unit: float) -> dict[str, Any]:
    """Greedy tokens and their logits on the smoke prompts; ``atol`` is ``atol_per_unit`` times
    max(1, largest |logit| recorded)."""
    tokens: list[list[int]] = []
    logits: list[list[float]] = []
    for prompt in SMOKE_PROMPTS:
        rows = list(_walk(stepper, encode(prompt), None, SMOKE_NEW_TOKENS))
        if not all(np.all(np.isfinite(row)) for row in rows):
            raise BundleError(
                f"the model outputs NaN or infinity on the smoke prompt {prompt!r}; validate it first"
            )
        chosen = [int(np.argmax(row)) for row in rows]
        tokens.append(chosen)
        logits.append([round(float(row[t]), 6) for row, t in zip(rows, chosen, strict=True)])
    scale = max(1.0, max(abs(v) for row in logits for v in row))
    return {
        "kind": SMOKE_KIND,
        "prompts": list(SMOKE_PROMPTS),
        "new_tokens": SMOKE_NEW_TOKENS,
        "tokens": tokens,
        "logits": logits,
        "atol": float(f"{atol_per_unit * scale:.6g}"),
    }


def _read(smoke: Any, name: str) -> tuple[list[str], list[list[int]], list[list[float]], float]:
    try:
        prompts = [str(p) for p in smoke["prompts"]]
        tokens = [[int(t) for t in row] for row in smoke["tokens"]]
        logits = [[float(v) for v in row] for row in smoke["logits"]]
        atol = float(smoke["atol"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"bundle {name} records no usable decoder smoke tokens ({exc}); re-package it"
        ) from exc
    shapes_ok = len(prompts) == len(tokens) == len(logits) and all(
        len(t) == len(v) and t for t, v in zip(tokens, logits, strict=True)
    )
    if not shapes_ok or not atol >= 0:
        raise BundleError(f"bundle {name} has a malformed decoder smoke record; re-package it")
    return prompts, tokens, logits, atol


def check_decoder_smoke(stepper: Stepper, encode: Encode, smoke: Any, name: str) -> float:
    """Replay ``smoke`` (see the module docstring); return the largest logit difference, or raise
    BundleError naming the prompt and the first step that differs."""
    prompts, tokens, logits, atol = _read(smoke, name)
    worst = 0.0
    for number, (prompt, wanted, values) in enumerate(zip(prompts, tokens, logits, strict=True)):
        rows = _walk(stepper, encode(prompt), wanted, len(wanted))
        for step, (row, token, value) in enumerate(zip(rows, wanted, values, strict=True)):
            best = int(np.argmax(row))
            if not 0 <= token < row.size or (best != token and row[token] < row[best] - atol):
                raise BundleError(
                    f"bundle {name} generates differently from when it was packaged: smoke prompt {number} "
                    f"({prompt!r}), new token {step}: {best} instead of {token}"
                )
            diff = abs(float(row[token]) - value)
            worst = max(worst, diff)
            if not diff <= atol:
                raise BundleError(
                    f"bundle {name} gives different logits from when it was packaged: smoke prompt {number}, "
                    f"new token {step}: {float(row[token]):.6g} instead of {value:.6g} (atol {atol:.3g})"
                )
    return worst
