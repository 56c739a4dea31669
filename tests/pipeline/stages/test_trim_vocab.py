"""The trim-vocab stage on tiny encoders exported from PyTorch: WordPiece BERT and byte-level BPE RoBERTa."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from tokenizers import Tokenizer

from tests.builders import LABELS, make_bpe_tokenizer
from trimformer.artifact import ModelArtifact
from trimformer.errors import UserError
from trimformer.passes.fuse.fusion import FuseConfig
from trimformer.passes.trim_vocab import TrimVocabConfig, find_word_table
from trimformer.pipeline.stages.quantize import run_fuse
from trimformer.pipeline.stages.trim_vocab import run_trim_vocab
from trimformer.runtime.session import cpu_session
from trimformer.validation.reference import artifact_encoder

CORPUS = ["good phone today", "the car is bad", "my new phone was great", "this store is nice"]
HOLDOUT = ["i love this phone", "the car is bad"]


def _csv(path: Path, texts: list[str]) -> str:
    path.write_text("text\n" + "".join(f"{t}\n" for t in texts), encoding="utf-8")
    return str(path)


def _outputs(folder: Path, texts: list[str]) -> np.ndarray:
    artifact = ModelArtifact.open(folder)
    session = cpu_session(artifact.model_path)
    return np.asarray(session.run(None, artifact_encoder(artifact)(texts))[0])


def _table_rows(folder: Path) -> int:
    model = ir.from_proto(onnx.load(str(folder / "model.onnx")))
    shape = find_word_table(model.graph).shape
    assert shape is not None
    return int(shape[0])


def test_the_trimmed_encoder_gives_the_original_outputs_on_its_corpus(
    tiny_bert_onnx: Path, tmp_path: Path
) -> None:
    out = tmp_path / "trimmed"
    result = run_trim_vocab(
        tiny_bert_onnx,
        out,
        _csv(tmp_path / "c.csv", CORPUS),
        TrimVocabConfig(),
        holdout=_csv(tmp_path / "h.csv", HOLDOUT),
    )
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert _table_rows(out) == result["vocab_after"] == tokenizer.get_vocab_size()
    assert _table_rows(tiny_bert_onnx) > result["vocab_after"] + 10
    assert tokenizer.token_to_id("love") is None
    assert all(tokenizer.token_to_id(t) is not None for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
    # The same numbers from each graph with its own tokenizer (padded batch: the pad id holds).
    np.testing.assert_array_equal(_outputs(out, CORPUS), _outputs(tiny_bert_onnx, CORPUS))
    assert result["corpus_check"] == {"texts_changed": 0, "texts_compared": 4, "max_abs_diff": 0.0}
    # "love" splits into letters now: one held-out text of two tokenizes differently.
    assert result["holdout"]["tokenization_changed"] == 0.5
    assert set(result["holdout"]) >= {"label_agreement", "texts_compared"}
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == result["vocab_after"] and config["pad_token_id"] == 0
    step = ModelArtifact.open(out).meta.lineage[-1]
    assert step.step == "trim-vocab" and step.params["coverage"] == 1.0
    assert step.stats["vocab_before"] == result["vocab_before"] and "target" in step.params


def test_a_fused_graph_is_trimmed_through_its_embed_layer_norm(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    fused = tmp_path / "fused"
    run_fuse(tiny_bert_onnx, fused, FuseConfig())
    proto = onnx.load(str(fused / "model.onnx"))
    assert any(n.op_type == "EmbedLayerNormalization" for n in proto.graph.node)
    out = tmp_path / "trimmed"
    result = run_trim_vocab(fused, out, _csv(tmp_path / "c.csv", CORPUS), TrimVocabConfig())
    assert _table_rows(out) == result["vocab_after"]
    np.testing.assert_allclose(_outputs(out, CORPUS), _outputs(fused, CORPUS), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_roberta_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RoBERTa classifier with a byte-level BPE tokenizer and its slow files (vocab.json, merges.txt)."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    from trimformer.exporters import export_model

    folder = tmp_path_factory.mktemp("roberta") / "model"
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=0,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(folder))
    tokenizer = make_bpe_tokenizer(vocab=400)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json and merges.txt
    out = folder.parent / "onnx"
    export_model(folder, out)
    return out


def test_byte_level_bpe_encoder_and_its_slow_files(tiny_roberta_onnx: Path, tmp_path: Path) -> None:
    assert (tiny_roberta_onnx / "merges.txt").is_file()
    out = tmp_path / "trimmed"
    result = run_trim_vocab(tiny_roberta_onnx, out, _csv(tmp_path / "c.csv", CORPUS), TrimVocabConfig())
    assert result["family"] == "BPE" and result["vocab_after"] < result["vocab_before"]
    np.testing.assert_array_equal(_outputs(out, CORPUS), _outputs(tiny_roberta_onnx, CORPUS))
    spec = json.loads((out / "tokenizer.json").read_text())
    assert json.loads((out / "vocab.json").read_text()) == spec["model"]["vocab"]
    merges = (out / "merges.txt").read_text().splitlines()[1:]
    assert (
        len(merges)
        == len(spec["model"]["merges"])
        < len((tiny_roberta_onnx / "merges.txt").read_text().splitlines())
    )


def test_a_quantized_word_table_is_refused(tiny_bert_onnx: Path) -> None:
    model = ir.from_proto(onnx.load(str(tiny_bert_onnx / "model.onnx")))
    ids = model.graph.inputs[0]
    node = ir.node("GatherBlockQuantized", [ids, ids, ids], domain="com.microsoft")
    model.graph.append(node)
    with pytest.raises(UserError, match="trim the vocabulary before quantizing"):
        find_word_table(model.graph)
