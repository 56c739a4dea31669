"""The family registry: what trimformer knows about each Hugging Face ``model_type``.

One entry per family: whether it is an encoder or a decoder, the graph inputs it takes, where its
Transformer blocks live, what its projections are called, and which config keys hold its
dimensions. Loading, distillation's student shapes and the decoder export read this table, so a
new family is one more entry here.

Torch-free on purpose (plain dataclasses): anything may read it without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trimformer.errors import UserError
from trimformer.formats.tasks import CAUSAL_LM

__all__ = [
    "DECODER_FAMILIES",
    "ENCODER_FAMILIES",
    "FAMILIES",
    "Dimensions",
    "FamilySpec",
    "family_of",
]


@dataclass(frozen=True)
class Dimensions:
    """The config keys that hold a family's dimensions (``None``: the family has no such key)."""

    layers: str = "num_hidden_layers"
    hidden: str = "hidden_size"
    heads: str = "num_attention_heads"
    ffn: str = "intermediate_size"
    kv_heads: str | None = None
    positions: str = "max_position_embeddings"
    vocab: str = "vocab_size"


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    decoder: bool
    # Graph inputs of the encoder export (decoders take the causal-LM task's inputs and the cache).
    inputs: tuple[str, ...]
    # Attribute path from the bare model (AutoModel / the ``model`` of a *ForCausalLM) to the
    # ModuleList of blocks, and each block's projections by role.
    layers: str
    projections: dict[str, str] = field(default_factory=dict)
    dims: Dimensions = field(default_factory=Dimensions)
    # The attribute holding the bare model inside a model with a task head.
    base: str = ""
    # Positions a family reserves before the first token (RoBERTa: padding_idx + 1).
    reserved_positions: int = 0


_BERT_PROJECTIONS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "up": "intermediate.dense",
    "down": "output.dense",
}
_LLAMA_PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_LLAMA_DIMS = Dimensions(kv_heads="num_key_value_heads")

_ENTRIES = (
    FamilySpec("bert", False, ("input_ids", "attention_mask", "token_type_ids"), "encoder.layer",
               _BERT_PROJECTIONS, base="bert"),
    FamilySpec("roberta", False, ("input_ids", "attention_mask"), "encoder.layer", _BERT_PROJECTIONS,
               base="roberta", reserved_positions=2),
    FamilySpec("xlm-roberta", False, ("input_ids", "attention_mask"), "encoder.layer", _BERT_PROJECTIONS,
               base="roberta", reserved_positions=2),
    FamilySpec(
        "distilbert", False, ("input_ids", "attention_mask"), "transformer.layer",
        {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
         "up": "ffn.lin1", "down": "ffn.lin2"},
        Dimensions(layers="n_layers", hidden="dim", heads="n_heads", ffn="hidden_dim"),
        base="distilbert",
    ),
    FamilySpec("llama", True, (), "layers", _LLAMA_PROJECTIONS, _LLAMA_DIMS, base="model"),
    FamilySpec("mistral", True, (), "layers", _LLAMA_PROJECTIONS, _LLAMA_DIMS, base="model"),
    FamilySpec("qwen2", True, (), "layers", _LLAMA_PROJECTIONS, _LLAMA_DIMS, base="model"),
    FamilySpec("qwen3", True, (), "layers", _LLAMA_PROJECTIONS, _LLAMA_DIMS, base="model"),
    FamilySpec(
        "gpt2", True, (), "h",
        {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        Dimensions(layers="n_layer", hidden="n_embd", heads="n_head", ffn="n_inner", positions="n_positions"),
        base="transformer",
    ),
)  # fmt: skip

FAMILIES: dict[str, FamilySpec] = {spec.model_type: spec for spec in _ENTRIES}
ENCODER_FAMILIES: tuple[str, ...] = tuple(name for name, spec in FAMILIES.items() if not spec.decoder)
DECODER_FAMILIES: tuple[str, ...] = tuple(name for name, spec in FAMILIES.items() if spec.decoder)


def family_of(model_type: str, where: str, task: str | None = None) -> FamilySpec:
    """The entry of ``model_type``; an unknown family, or a decoder given to an encoder-only
    command (and the reverse), is one line naming what is supported."""
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise UserError(
            f"{where} holds a {model_type or 'unknown'} model; supported families: encoders "
            f"{', '.join(ENCODER_FAMILIES)} (MiniLM checkpoints are bert); causal language models "
            f"{', '.join(DECODER_FAMILIES)}"
        )
    if task is not None and spec.decoder != (task == CAUSAL_LM):
        if spec.decoder:
            raise UserError(
                f"{where} is a causal language model ({model_type}); this command takes an encoder "
                f"({', '.join(ENCODER_FAMILIES)}) for the {task} task"
            )
        raise UserError(
            f"{where} is an encoder ({model_type}); the causal-lm task takes a decoder "
            f"({', '.join(DECODER_FAMILIES)})"
        )
    return spec
