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
    "GENAI_CONFIG_FILE",
    "DecoderSpec",
    "genai_config",
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
# What onnxruntime-genai reads to run a folder's decoder with its own Generator (C, C++, C#, Java,
# Python; on phones too): see :func:`genai_config`.
GENAI_CONFIG_FILE = "genai_config.json"
# onnxruntime-genai's decoder-only model types (its ``ModelType::IsLLM``) among the families the
# export knows; any other family runs as its generic ``decoder``.
_GENAI_TYPES = frozenset(
    {"gemma", "gemma2", "gpt2", "granite", "llama", "mistral", "phi", "phi3", "qwen2", "qwen3"}
)


# The cache's io names, genai's way (``%d``: the layer).
_PAST_KEY, _PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
_PRESENT_KEY, _PRESENT_VALUE = "present.%d.key", "present.%d.value"


def past_key_name(layer: int) -> str:
    return _PAST_KEY % layer


def past_value_name(layer: int) -> str:
    return _PAST_VALUE % layer


def present_key_name(layer: int) -> str:
    return _PRESENT_KEY % layer


def present_value_name(layer: int) -> str:
    return _PRESENT_VALUE % layer


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


def genai_config(
    spec: DecoderSpec, *, model_file: str, in_place: bool, search: dict[str, Any]
) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for a graph of this contract.

    The io names are the contract's (the builder's own, plus ``position_ids``, which genai feeds
    from the attention mask as the Generator does). ``past_present_share_buffer`` is set where the
    cache can be kept in place (``CACHE_IN_PLACE_KEY``: every present from GroupQueryAttention),
    as the builder sets it for its graphs: one buffer per layer, written by the kernel. ``search``
    holds the default search settings (genai's keys); the context is the model's."""
    eos = spec.eos_token_ids
    return {
        "model": {
            "type": spec.family if spec.family in _GENAI_TYPES else "decoder",
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else (eos or [0])[0],
            "eos_token_id": eos[0] if len(eos) == 1 else list(eos),
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else (eos or [0])[0],
            "context_length": spec.context_length,
            "vocab_size": spec.vocab_size,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "num_attention_heads": spec.num_heads,
                "num_key_value_heads": spec.num_kv_heads,
                "num_hidden_layers": spec.num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": _PAST_KEY,
                    "past_value_names": _PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": _PRESENT_KEY,
                    "present_value_names": _PRESENT_VALUE,
                },
            },
        },
        "search": {
            "max_length": spec.context_length,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": in_place,
            **search,
        },
    }
