from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from tests.builders import make_hf_model, make_tokenizer
from trimformer.artifact import ModelArtifact
from trimformer.errors import ParityError, UserError
from trimformer.exporters import export_model, random_feeds
from trimformer.sources import load_source


def _run(artifact: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n] for n in names})[0]


@pytest.mark.parametrize(
    ("model_type", "task"),
    [
        ("bert", "sequence-classification"),
        ("distilbert", "sequence-classification"),
        ("roberta", "sequence-classification"),
        ("bert", "feature-extraction"),
    ],
)
def test_export_has_dynamic_axes_and_matches_pytorch(tmp_path: Path, model_type: str, task: str) -> None:
    src = make_hf_model(tmp_path / "src", model_type=model_type, task=task)
    result = export_model(src, tmp_path / "out")
    art = ModelArtifact.open(tmp_path / "out")
    assert art.meta.task == task
    assert all(spec.shape == ["batch", "sequence"] for spec in art.meta.inputs)
    assert art.meta.lineage[0].step == "export"
    assert result.parity.worst < 1e-4
    # A shape never traced nor parity-checked by the exporter.
    source = load_source(src)
    feeds = random_feeds(source.io.input_names, 5, 33, 60, seed=9)
    with torch.inference_mode():
        want = source.module(*(torch.from_numpy(feeds[n]) for n in source.io.input_names)).numpy()
    np.testing.assert_allclose(_run(tmp_path / "out", feeds), want, atol=1e-4)


def test_plain_model_exports(tiny_plain_onnx: Path) -> None:
    art = ModelArtifact.open(tiny_plain_onnx)
    assert art.meta.architecture == "plain-transformer"
    assert [s.name for s in art.meta.inputs] == ["input_ids", "attention_mask"]
    config = json.loads((tiny_plain_onnx / "config.json").read_text())
    assert config["id2label"]["2"] == "positive"


def test_artifact_carries_tokenizer_and_lineage(tiny_bert_onnx: Path) -> None:
    meta = json.loads((tiny_bert_onnx / "trimformer.json").read_text())
    # The artifact's tokenizer encodes like the source's (ids and token types, pairs too).
    shipped = Tokenizer.from_file(str(tiny_bert_onnx / "tokenizer.json")).encode("good phone", "bad")
    source = make_tokenizer().encode("good phone", "bad")
    assert (shipped.ids, shipped.type_ids) == (source.ids, source.type_ids)
    step = meta["lineage"][0]
    assert step["params"]["opset"] == 17 and step["input_hash"].startswith("sha256:")
    assert step["output_hash"] == ModelArtifact.open(tiny_bert_onnx).model_hash()
    assert onnx.load(str(tiny_bert_onnx / "model.onnx")).opset_import[0].version == 17


def test_parity_failure_names_output_and_leaves_nothing(tmp_path: Path) -> None:
    src = make_hf_model(tmp_path / "src")
    with pytest.raises(ParityError, match=r"output 'logits' at batch \d+ x \d+ tokens differs"):
        export_model(src, tmp_path / "out", atol=1e-12)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_overwrite(tiny_bert: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export_model(tiny_bert, tmp_path / "out")
    export_model(tiny_bert, tmp_path / "out", overwrite=True)
    assert ModelArtifact.open(tmp_path / "out").meta.lineage[-1].step == "export"


def test_bad_opset_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="opset 9 is not supported"):
        export_model(tiny_bert, tmp_path / "out", opset=9)
