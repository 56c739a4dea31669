"""Choosing the next token from a row of logits: the generation settings and what they do.

The order is Hugging Face's (``transformers`` logits processors): repetition penalty on the logits,
then temperature, then top-k, then top-p (nucleus) on the softmax, then a draw from a seeded numpy
generator. Temperature 0 is greedy (argmax after the penalty). numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> GenerationSettings:
        """Settings from a recipe table, a package option or a bundle manifest: every key known and
        every value of its type, checked here (``where`` names the source in the message)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"{where}: unknown generation settings {unknown}; known: {sorted(known)}")
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            try:
                parsed[key] = _coerce(key, value)
            except (TypeError, ValueError):
                raise UserError(
                    f"{where}: generation setting {key} = {value!r} is not a valid value"
                ) from None
        return cls(**parsed)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> GenerationSettings:
        """The defaults a Hugging Face ``generation_config.json`` asks for (greedy unless do_sample;
        HF's own defaults for sampling fields it leaves out)."""
        values: dict[str, Any] = {}
        if config.get("max_new_tokens"):
            values["max_new_tokens"] = config["max_new_tokens"]
        if config.get("repetition_penalty") is not None:
            values["repetition_penalty"] = config["repetition_penalty"]
        if config.get("do_sample"):
            values["temperature"] = config.get("temperature", 1.0)
            values["top_k"] = config.get("top_k", 50)
            values["top_p"] = config.get("top_p", 1.0)
        stops = config.get("stop_strings")
        if stops:
            values["stop_strings"] = [stops] if isinstance(stops, str) else stops
        return cls.from_dict(values, "generation_config.json")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["stop_strings"] = list(self.stop_strings)
        values["stop_tokens"] = list(self.stop_tokens)
        return values


def _coerce(key: str, value: Any) -> Any:
    """One setting's value as its field's type; bools are refused where numbers are meant."""
    if isinstance(value, bool):
        raise TypeError(key)
    if key in ("stop_strings", "stop_tokens"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise TypeError(key)
        kind = str if key == "stop_strings" else int
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise TypeError(key)
        return tuple(value)
    if key == "seed":
        if value is None:
            return None
        if not isinstance(value, int):
            raise TypeError(key)
        return value
    if key in ("max_new_tokens", "top_k"):
        if not isinstance(value, int):
            raise TypeError(key)
        return value
    if not isinstance(value, (int, float)):
        raise TypeError(key)
    return float(value)


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
