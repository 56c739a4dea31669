"""Choosing the next token from a row of logits: the generation settings and what they do.

The order is Hugging Face's (``transformers`` logits processors): repetition penalty on the logits,
then temperature, then top-k, then top-p (nucleus) on the softmax, then a draw from a seeded numpy
generator. Temperature 0 is greedy (argmax after the penalty). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trimformer.errors import UserError

__all__ = ["GenerationSettings", "next_token"]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()  # besides the model's eos tokens
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be 0 (greedy) or more, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be 0 (off) or more, got {self.top_k}"),
            (
                self.repetition_penalty > 0,
                f"repetition_penalty must be positive, got {self.repetition_penalty}",
            ),
            (all(s for s in self.stop_strings), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _penalise(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's repetition penalty: seen tokens' positive logits divided, negative ones multiplied."""
    if penalty == 1.0 or not seen.size:
        return logits
    out = logits.copy()
    chosen = out[seen]
    out[seen] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out


def next_token(
    logits: np.ndarray, seen: np.ndarray, settings: GenerationSettings, rng: np.random.Generator
) -> int:
    """The next token id from one row of ``logits`` [vocab]; ``seen`` are the ids so far."""
    scores = _penalise(logits.astype(np.float64), np.unique(seen), settings.repetition_penalty)
    if settings.greedy:
        return int(np.argmax(scores))
    scores = scores / settings.temperature
    if 0 < settings.top_k < scores.size:
        kth = np.partition(scores, -settings.top_k)[-settings.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if settings.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = order[: int(np.searchsorted(cumulative, settings.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))
