"""The Triton repository in a bundle: every config.pbtxt parsed by Triton's own schema
(model_config.proto as tritonclient ships it), the ensemble run step by step (the Python backend's
model.py against a stand-in of triton_python_backend_utils that follows its documented API, the ONNX
entry in onnxruntime) answering as Predictor, the files verified with the bundle, and what is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from tests.builders import make_hf_model
from tests.triton_backend import model_config_pb2, parse, run_ensemble, stand_in
from trimformer.cli.commands import cli
from trimformer.errors import UserError
from trimformer.exporters import export_model
from trimformer.packaging.package import package_artifact
from trimformer.packaging.triton import TritonOptions
from trimformer.runtime import MANIFEST, Predictor, verify_bundle
from trimformer.runtime.bundle import BundleError

TEXTS = ["great phone, love it", "the battery died after a day " * 40, "ok", "Café crème — 10/10 👍"]


@pytest.fixture(scope="module")
def classifier(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "sentiment"
    options = TritonOptions(max_batch_size=16, max_queue_delay_ms=2.5, threads=2)
    package_artifact(tiny_bert_onnx, out, layout="triton", triton=options)
    return out


def test_every_config_parses_with_tritons_schema_and_matches_the_graph(classifier: Path) -> None:
    repository = classifier / "triton"
    assert sorted(p.name for p in repository.iterdir()) == [
        "sentiment", "sentiment_onnx", "sentiment_scores", "sentiment_tokenizer",
    ]  # fmt: skip
    onnx_config = parse(repository / "sentiment_onnx" / "config.pbtxt")
    assert onnx_config.platform == "onnxruntime_onnx" and onnx_config.max_batch_size == 16
    assert list(onnx_config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert onnx_config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert onnx_config.instance_group[0].kind == model_config_pb2().ModelInstanceGroup.KIND_CPU
    assert onnx_config.parameters["intra_op_thread_count"].string_value == "2"
    # Dims without Triton's implicit batch dimension: -1 where the graph's are dynamic.
    session = ort.InferenceSession(str(repository / "sentiment_onnx" / "1" / "model.onnx"))
    assert {(i.name, tuple(i.dims)) for i in onnx_config.input} == {
        (i.name, (-1,)) for i in session.get_inputs()
    }
    labels = len(Predictor(classifier).labels)
    assert [(o.name, list(o.dims)) for o in onnx_config.output] == [("logits", [labels])]
    scores = parse(repository / "sentiment_scores" / "config.pbtxt")
    assert [(o.name, list(o.dims)) for o in scores.output] == [("label", [1]), ("scores", [labels])]
    assert (repository / "sentiment_onnx" / "1" / "model.onnx").read_bytes() == (
        classifier / "model.onnx"
    ).read_bytes()
    ensemble = parse(repository / "sentiment" / "config.pbtxt")
    assert ensemble.platform == "ensemble" and [i.name for i in ensemble.input] == ["text"]
    assert [o.name for o in ensemble.output] == ["label", "scores"]
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == [
        "sentiment_tokenizer", "sentiment_onnx", "sentiment_scores",
    ]  # fmt: skip
    manifest = json.loads((classifier / MANIFEST).read_text())
    assert manifest["layouts"]["triton"]["models"]["ensemble"] == "sentiment"
    assert "triton/sentiment_tokenizer/1/model.py" in manifest["files"]


def test_the_ensemble_answers_as_the_predictor(classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in())
    got = run_ensemble(classifier / "triton", "sentiment", TEXTS)
    expected = Predictor(classifier).predict(TEXTS)
    assert [label.decode() for label in got["label"].reshape(-1)] == [p.label for p in expected]
    labels = Predictor(classifier).labels
    want = np.asarray([[p.scores[label] for label in labels] for p in expected])
    np.testing.assert_allclose(got["scores"], want, atol=1e-6)
    assert got["scores"].dtype == np.float32 and got["label"].shape == (len(TEXTS), 1)


def test_a_feature_extraction_bundle_returns_the_predictors_embeddings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_hf_model(tmp_path / "src", task="feature-extraction", pooling="mean")
    export_model(source, tmp_path / "onnx")
    package_artifact(tmp_path / "onnx", tmp_path / "embedder", layout="triton")
    repository = tmp_path / "embedder" / "triton"
    assert not (repository / "embedder_scores").exists()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in())
    got = run_ensemble(repository, "embedder", TEXTS)
    np.testing.assert_allclose(
        got["sentence_embedding"], Predictor(tmp_path / "embedder").embed(TEXTS), atol=1e-5
    )


def test_verify_checks_the_repository(classifier: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(classifier, copy)
    checked = verify_bundle(copy)
    assert checked["task"] == "sequence-classification" and checked["triton"]["repository"] == "triton"
    tokenizer = copy / "triton" / "sentiment_tokenizer" / "1" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"ok"', '"ko"', 1) + " ")
    with pytest.raises(BundleError, match=r"tokenizer\.json"):
        verify_bundle(copy)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "helm"], "unknown layout 'helm'; known: triton"),
        (["--layout", "triton", "--name", "bad/name"], "must be 1 to 128 letters"),
        (
            ["--layout", "triton", "--triton-max-batch-size", "0"],
            "--triton-max-batch-size must be at least 1",
        ),
        (["--triton-kind", "gpu"], "--triton-kind apply to the Triton repository; add --layout triton"),
        (["--layout", "triton", "--triton-kind", "tpu"], "--triton-kind is cpu or gpu"),
        (
            ["--layout", "triton", "--triton-max-queue-delay-ms", "inf"],
            "--triton-max-queue-delay-ms must be 0",
        ),
    ],
)
def test_refusals_are_one_line_exit_2_and_write_nothing(
    tiny_bert_onnx: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, ["package", str(tiny_bert_onnx), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_decoder_bundle_is_refused(tmp_path: Path) -> None:
    from tests.builders import make_causal_lm

    export_model(make_causal_lm(tmp_path / "hf", context=64), tmp_path / "onnx", parity_tokens=2)
    with pytest.raises(UserError, match="does not support causal language models yet"):
        package_artifact(tmp_path / "onnx", tmp_path / "out", layout="triton")
    assert not (tmp_path / "out").exists()


def _repin(bundle: Path, manifest: dict) -> None:
    """Write ``manifest`` and re-pin its digest, as someone who rewrites the whole folder could."""
    import hashlib

    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (bundle / MANIFEST).write_bytes(raw)
    (bundle / "manifest.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


def test_verify_refuses_an_unreadable_triton_layout_in_one_error(classifier: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(classifier, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["layouts"]["triton"]["models"]["onnx"]
    _repin(copy, manifest)
    with pytest.raises(BundleError, match="Triton layout is unreadable"):
        verify_bundle(copy)


def test_verify_refuses_a_repository_that_serves_another_model(classifier: Path, tmp_path: Path) -> None:
    """Hashes all agree (the manifest rewritten and re-pinned), but the repository's model is not the bundle's."""
    import hashlib
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(classifier, copy)
    repository_model = copy / "triton" / "sentiment_onnx" / "1" / "model.onnx"
    repository_model.write_bytes(repository_model.read_bytes() + b"\0")
    manifest = json.loads((copy / MANIFEST).read_text())
    data = repository_model.read_bytes()
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["files"]["triton/sentiment_onnx/1/model.onnx"] = entry
    _repin(copy, manifest)
    with pytest.raises(BundleError, match=r"sentiment_onnx/1/model\.onnx is not the bundle's model\.onnx"):
        verify_bundle(copy)
