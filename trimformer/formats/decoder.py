"""What a causal-LM graph is: the contract between the decoder export, passes, runtime and validation.

A causal-LM artifact's graph takes, for each of ``num_layers`` layers::

    input_ids        int64 [batch, sequence]
    attention_mask   int64 [batch, past_sequence + sequence]   (1 = real token, 0 = padding)
    position_ids     int64 [batch, sequence]
    past_key_values.N.key / .value   float32 [batch, num_kv_heads, past_sequence, head_dim]

and returns ``logits`` float32 [batch, sequence, vocab_size] and ``present.N.key`` /
``present.N.value`` float32 [batch, num_kv_heads, past_sequence + sequence, head_dim] (the names
onnxruntime-genai and Optimum use). The prompt runs with ``past_sequence = 0``; every decode step
feeds the previous step's presents back as pasts.

The spec lives in ``trimformer.json`` under ``extras["decoder"]`` (and in a bundle's manifest), so
that readers of older artifacts and the encoder code paths are untouched. Plain dataclasses: the
runtime reads this module and carries no pydantic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trimformer.errors import UserError

__all__ = [
    "CACHE_IN_PLACE_KEY",
    "DECODER_EXTRAS_KEY",
    "DecoderSpec",
    "past_key_name",
    "past_value_name",
    "present_key_name",
    "present_value_name",
]

DECODER_EXTRAS_KEY = "decoder"
# Set (True) in an artifact's extras when every present comes from GroupQueryAttention, which can
# write each step's keys and values into the past buffer itself: a session may then bind each
# layer's past and present to one buffer (``runtime.decoding.CachedSession(in_place=True)``).
CACHE_IN_PLACE_KEY = "decoder_cache_in_place"


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


_POSITIVE = (
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "context_length",
)


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    # The longest past + sequence the model was trained for (max_position_embeddings).
    context_length: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"decoder spec: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"decoder spec: {self.num_heads} query heads do not split over {self.num_kv_heads} KV heads"
            )

    def past_names(self) -> list[str]:
        names = []
        for layer in range(self.num_layers):
            names += [past_key_name(layer), past_value_name(layer)]
        return names

    def present_names(self) -> list[str]:
        names = []
        for layer in range(self.num_layers):
            names += [present_key_name(layer), present_value_name(layer)]
        return names

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]

    def to_extras(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "the artifact") -> DecoderSpec:
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise UserError(f"{where} has an unreadable decoder spec; re-export the model")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: {exc}; re-export the model") from exc

    @classmethod
    def from_extras(cls, extras: dict[str, Any], where: str = "the artifact") -> DecoderSpec:
        raw = extras.get(DECODER_EXTRAS_KEY)
        if raw is None:
            raise UserError(f"{where} is not a causal language model (no decoder spec in trimformer.json)")
        return cls.from_dict(raw, where)
