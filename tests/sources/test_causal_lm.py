from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.builders import make_causal_lm, make_hf_model
from trimformer.errors import UserError
from trimformer.sources import load_source
from trimformer.sources.families import DECODER_FAMILIES


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_each_decoder_family_loads_with_its_dimensions(tmp_path: Path, family: str) -> None:
    source = load_source(make_causal_lm(tmp_path / family, family))
    assert source.task == "causal-lm" and source.architecture == family
    assert source.io.input_names == ("input_ids", "attention_mask", "position_ids")
    spec = source.config["trimformer_decoder"]
    assert spec["num_layers"] == 2 and spec["num_heads"] == 4
    # The Llama layouts are built with grouped-query attention; GPT-2 has one KV head per head.
    assert spec["num_kv_heads"] == (4 if family == "gpt2" else 2)
    assert spec["head_dim"] == 8 and spec["bos_token_id"] == 1 and spec["eos_token_ids"] == [2]
    assert source.max_length == 128


def test_causal_lm_module_matches_the_model_and_is_causal(tmp_path: Path) -> None:
    source = load_source(make_causal_lm(tmp_path / "llama"))
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    mask = torch.ones_like(ids)
    positions = torch.arange(5).unsqueeze(0)
    logits = source.module(ids, mask, positions)
    assert logits.shape == (1, 5, source.config["trimformer_decoder"]["vocab_size"])
    # A later token never changes an earlier position's logits.
    changed = ids.clone()
    changed[0, 4] = 50
    assert torch.allclose(source.module(changed, mask, positions)[0, :4], logits[0, :4], atol=1e-6)
    assert not torch.allclose(source.module(changed, mask, positions)[0, 4], logits[0, 4])


def test_unsupported_decoder_family_lists_the_supported_ones(tmp_path: Path) -> None:
    folder = make_causal_lm(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "falcon"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_source(folder)
    message = str(err.value)
    assert "falcon" in message and all(family in message for family in DECODER_FAMILIES)


def test_causal_lm_given_to_an_encoder_task_is_refused(tmp_path: Path) -> None:
    folder = make_causal_lm(tmp_path / "llama")
    with pytest.raises(
        UserError, match="is a causal language model \\(llama\\); this command takes an encoder"
    ):
        load_source(folder, task="sequence-classification")


def test_encoder_given_to_the_causal_lm_task_is_refused(tmp_path: Path) -> None:
    folder = make_hf_model(tmp_path / "bert")
    with pytest.raises(UserError, match="is an encoder \\(bert\\); the causal-lm task takes a decoder"):
        load_source(folder, task="causal-lm")


def test_tokenizer_without_the_models_eos_is_refused(tmp_path: Path) -> None:
    folder = make_causal_lm(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = 5000  # beyond the tokenizer's vocabulary
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no token for the model's eos id 5000"):
        load_source(folder)


def test_weights_that_do_not_fit_the_config_are_refused_not_reinitialised(tmp_path: Path) -> None:
    folder = make_causal_lm(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 6000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="cannot load the model in"):
        load_source(folder)


def test_missing_weights_are_refused_not_reinitialised(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_causal_lm(tmp_path / "llama")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"do not fit its config.json \(1 missing keys, e.g. model.layers.1"):
        load_source(folder)
