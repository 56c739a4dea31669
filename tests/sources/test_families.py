from __future__ import annotations

import pytest

from trimformer.errors import UserError
from trimformer.sources.families import DECODER_FAMILIES, ENCODER_FAMILIES, FAMILIES, family_of
from trimformer.sources.hf import SUPPORTED_ARCHITECTURES


def test_registry_splits_encoders_and_decoders() -> None:
    assert set(ENCODER_FAMILIES) == {"bert", "distilbert", "roberta", "xlm-roberta"}
    assert set(DECODER_FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gpt2"}
    # The encoder loader reads its graph inputs from the registry.
    assert {name: FAMILIES[name].inputs for name in ENCODER_FAMILIES} == SUPPORTED_ARCHITECTURES


def test_llama_layout_names_its_projections_and_kv_heads() -> None:
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        spec = FAMILIES[name]
        assert spec.projections["k"] == "self_attn.k_proj" and spec.projections["gate"] == "mlp.gate_proj"
        assert spec.dims.kv_heads == "num_key_value_heads" and spec.layers == "layers"


def test_unknown_family_is_one_line_naming_both_lists() -> None:
    with pytest.raises(UserError) as err:
        family_of("t5", "folder x")
    message = str(err.value)
    assert "\n" not in message and "t5" in message and "bert" in message and "qwen3" in message
