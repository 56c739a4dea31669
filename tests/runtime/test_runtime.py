"""Runtime: imports, encoding parity with validation, predictions, batching, threads, bad calls."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from trimformer.errors import UserError
from trimformer.packaging.package import package_artifact
from trimformer.runtime import Prediction, Predictor

TEXTS = [
    "good phone",
    "the worst store today, broken and sad",
    "",
    "a " * 300,
    "I love this new apple phone, it is the best",
    "Café 👍 ok",  # no "z": tests/builders.py gives the plain model one row too few (see report)
    "it was ok",
]


@pytest.fixture(scope="module")
def bert_bundle(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runtime") / "bert"
    package_artifact(tiny_bert_onnx, out)
    return out


@pytest.fixture(scope="module")
def plain_bundle(tiny_plain_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runtime") / "plain"
    package_artifact(tiny_plain_onnx, out)
    return out


def test_runtime_imports_no_torch_onnx_or_pydantic(bert_bundle: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        from trimformer.runtime import Predictor, verify_bundle
        p = Predictor({str(bert_bundle)!r})
        labels = [x.label for x in p.predict(["good phone", "bad"])]
        verify_bundle({str(bert_bundle) + ".tar.gz"!r})
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "onnx", "pydantic", "transformers", "onnx_ir", "click")
                       or m in ("trimformer.artifact", "trimformer.onnx_io", "trimformer.sources"))
        print(json.dumps({{"heavy": heavy, "labels": labels}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert len(result["labels"]) == 2


@pytest.mark.parametrize("which", ["bert", "plain"])
def test_outputs_match_the_validation_path(
    which: str, bert_bundle: Path, plain_bundle: Path, tiny_bert_onnx: Path, tiny_plain_onnx: Path
) -> None:
    """The runtime tokenizes and runs exactly like `trimformer validate` does."""
    from trimformer.artifact import ModelArtifact
    from trimformer.data import Encoder
    from trimformer.data.tokenizer import load_tokenizer
    from trimformer.validation.runners import OrtRunner

    bundle, artifact_dir = (
        (bert_bundle, tiny_bert_onnx) if which == "bert" else (plain_bundle, tiny_plain_onnx)
    )
    art = ModelArtifact.open(artifact_dir)
    names = tuple(s.name for s in art.meta.inputs)
    encoder = Encoder(
        load_tokenizer(art.path), names, art.meta.tokenizer.max_length, art.meta.tokenizer.pad_token_id
    )
    expected = OrtRunner(art, threads=1).run(encoder(TEXTS))
    predictor = Predictor(bundle, threads=1, batch_size=len(TEXTS))
    np.testing.assert_allclose(predictor.run(TEXTS), expected, atol=1e-6)
    feeds = predictor._encoder(TEXTS)
    for name, array in encoder(TEXTS).items():
        np.testing.assert_array_equal(feeds[name], array)


def test_predict_gives_labels_and_probabilities(bert_bundle: Path) -> None:
    predictor = Predictor(bert_bundle)
    predictions = predictor.predict(TEXTS)
    assert len(predictions) == len(TEXTS) and all(isinstance(p, Prediction) for p in predictions)
    logits = predictor.run(TEXTS)
    for prediction, row in zip(predictions, logits, strict=True):
        assert prediction.label == predictor.labels[int(row.argmax())]
        assert sum(prediction.scores.values()) == pytest.approx(1.0)
        assert prediction.score == max(prediction.scores.values())
    assert predictor.labels == ("negative", "neutral", "positive")
    assert predictor.predict([]) == []
    pairs = predictor.predict(["good phone", "bad"], pairs=["it is", "sad"])
    assert len(pairs) == 2


def test_batching_keeps_order_and_values(bert_bundle: Path) -> None:
    whole = Predictor(bert_bundle, batch_size=64).run(TEXTS * 3)
    small = Predictor(bert_bundle, batch_size=2).run(TEXTS * 3)
    single = np.concatenate([Predictor(bert_bundle, batch_size=1).run([t]) for t in TEXTS * 3])
    # Padding differs between batchings; the mask makes the numbers agree to float rounding.
    np.testing.assert_allclose(small, whole, atol=1e-5)
    np.testing.assert_allclose(single, whole, atol=1e-5)


def test_concurrent_calls_match_sequential_ones(bert_bundle: Path) -> None:
    predictor = Predictor(bert_bundle, threads=1)
    requests = [[TEXTS[i % len(TEXTS)], TEXTS[(i * 3) % len(TEXTS)]][: 1 + i % 2] for i in range(64)]
    sequential = [predictor.run(r) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(predictor.run, requests))
    for one, other in zip(sequential, threaded, strict=True):
        np.testing.assert_array_equal(one, other)


def test_bad_calls_are_refused(bert_bundle: Path) -> None:
    predictor = Predictor(bert_bundle)
    with pytest.raises(TypeError, match="not one string"):
        predictor.predict("good phone")
    with pytest.raises(TypeError, match="must hold strings"):
        predictor.predict(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 texts but 1 pairs"):
        predictor.run(["a", "b"], pairs=["c"])
    with pytest.raises(UserError, match="call predict"):
        predictor.embed(["x"])
    with pytest.raises(UserError, match="batch_size must be at least 1"):
        Predictor(bert_bundle, batch_size=0)
    with pytest.raises(UserError, match="threads must be at least 1"):
        Predictor(bert_bundle, threads=0)
    with pytest.raises(UserError, match="not available in the installed onnxruntime"):
        Predictor(
            bert_bundle,
            provider="tensorrt"
            if "TensorrtExecutionProvider" not in ort.get_available_providers()
            else "nope",
        )
    with pytest.raises(UserError, match="no ORT-format model"):
        Predictor(bert_bundle, model_format="ort")
    with pytest.raises(UserError, match="model_format"):
        Predictor(bert_bundle, model_format="tflite")


def test_describe(bert_bundle: Path) -> None:
    info = Predictor(bert_bundle).describe()
    assert info["task"] == "sequence-classification" and info["digest"].startswith("sha256:")
    assert info["providers"] == ["CPUExecutionProvider"] and info["smoke_max_abs_diff"] < 1e-5
