from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tests.builders import LABELS, make_hf_model, make_plain_model
from trimformer.errors import UserError
from trimformer.sources import load_source


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
def test_hf_classifier_loads_with_labels_and_inputs(tmp_path: Path, model_type: str) -> None:
    folder = make_hf_model(tmp_path / model_type, model_type=model_type)
    source = load_source(folder)
    assert source.task == "sequence-classification"
    assert source.labels == LABELS
    assert ("token_type_ids" in source.io.input_names) == (model_type == "bert")
    assert source.io.output_names == ("logits",)


def test_feature_extraction_uses_declared_pooling_and_normalisation(tmp_path: Path) -> None:
    folder = make_hf_model(tmp_path / "st", task="feature-extraction", pooling="mean_tokens")
    source = load_source(folder)
    assert source.task == "feature-extraction"
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    emb = source.module(ids, mask, torch.zeros_like(ids))
    assert emb.shape == (1, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    # Mean pooling ignores padding: changing a padded token's id must not change the embedding.
    ids2 = ids.clone()
    ids2[0, 5] = 12
    assert torch.allclose(emb, source.module(ids2, mask, torch.zeros_like(ids)), atol=1e-6)


def test_plain_model_round_trips(tmp_path: Path) -> None:
    folder = make_plain_model(tmp_path / "plain")
    source = load_source(folder)
    assert source.kind == "plain" and source.labels == LABELS
    assert source.io.input_names == ("input_ids", "attention_mask")


def test_pickle_checkpoint_is_loaded_weights_only(tmp_path: Path) -> None:
    folder = make_hf_model(tmp_path / "bin", safetensors=False)
    if (folder / "model.safetensors").exists():  # transformers 5 always writes safetensors
        from safetensors.torch import load_file

        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    source = load_source(folder)
    assert source.labels == LABELS
    # The weights are the pickle's, tensor for tensor.
    loaded = source.model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items() if name in loaded)
    assert "bert.embeddings.word_embeddings.weight" in saved.keys() & loaded.keys()


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = make_hf_model(tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": _Evil()}, handle)
    with pytest.raises(UserError, match="weights_only"):
        load_source(folder)


def test_unsupported_architecture_names_supported_ones(tmp_path: Path) -> None:
    folder = make_hf_model(tmp_path / "t5")
    config = (folder / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "t5"')
    (folder / "config.json").write_text(config)
    with pytest.raises(
        UserError, match=r"t5 model; supported families: encoders bert, roberta.*causal language models llama"
    ):
        load_source(folder)


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model in"):
        load_source(tmp_path / "empty")
