"""`package --layout kserve`: the InferenceService validated against KServe's own CRD schema (and
strict about unknown fields, as `kubectl apply --validate=strict`), serving the Triton repository over
the v2 protocol; one request body answered alike by `trimformer serve` and by that repository; refusals."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from starlette.testclient import TestClient

from tests.triton_backend import run_ensemble, stand_in
from trimformer.cli.commands import cli
from trimformer.packaging.kserve import KServeOptions
from trimformer.packaging.package import package_artifact
from trimformer.serving.app import build_app
from trimformer.serving.model import Limits, ServedModel

SCHEMA = Path(__file__).parents[1] / "fixtures" / "kserve" / "inferenceservice-v1beta1.schema.json.gz"
TEXTS = ["what a great day", "this is the worst phone ever", "ok", "Der Zug ist wieder zu spät"]


def _unknown_fields(document: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Keys the schema does not declare (the API server would drop them, strict validation refuses)."""
    if isinstance(document, list):
        item = schema.get("items", {})
        return [
            bad for i, value in enumerate(document) for bad in _unknown_fields(value, item, f"{where}[{i}]")
        ]
    if not isinstance(document, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    declared = schema.get("properties")
    if declared is None:  # a map (additionalProperties) or a free object
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return [bad for k, v in document.items() for bad in _unknown_fields(v, extra, f"{where}.{k}")]
        return []
    out = []
    for key, value in document.items():
        if key not in declared:
            out.append(f"{where}.{key}".lstrip("."))
        else:
            out += _unknown_fields(value, declared[key], f"{where}.{key}")
    return out


def _check_against_crd(service: dict[str, Any]) -> list[str]:
    schema = json.loads(gzip.decompress(SCHEMA.read_bytes()))
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(service)]
    return errors + [f"unknown field {f}" for f in _unknown_fields(service, schema)]


@pytest.fixture(scope="module")
def bundle(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kserve") / "sentiment"
    options = KServeOptions(storage_uri="s3://models/sentiment/triton", cpu="1500m", memory="1Gi")
    package_artifact(tiny_bert_onnx, out, layout="kserve", kserve=options)
    return out


def test_the_inference_service_is_valid_against_kserves_crd(bundle: Path) -> None:
    service = yaml.safe_load((bundle / "kserve" / "inferenceservice.yaml").read_text())
    assert _check_against_crd(service) == []
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"] == "s3://models/sentiment/triton"
    assert model["resources"]["limits"] == {"cpu": "1500m", "memory": "1Gi"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["layouts"]["kserve"]["file"] == "kserve/inferenceservice.yaml"
    assert "kserve/inferenceservice.yaml" in manifest["files"] and (bundle / "triton" / "sentiment").is_dir()


def test_the_crd_check_can_fail() -> None:
    service: dict[str, Any] = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "x"},
        "spec": {"predictor": {"model": {"modelFormat": {"name": "triton"}, "storageURI": "s3://a/b"}}},
    }
    assert _check_against_crd(service) == ["unknown field spec.predictor.model.storageURI"]
    service["spec"]["predictor"]["minReplicas"] = "two"
    assert any("'two' is not of type 'integer'" in e for e in _check_against_crd(service))


def test_one_request_body_is_answered_alike_by_serve_and_the_repository(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS), 1], "data": TEXTS}],
        "outputs": [{"name": "label"}, {"name": "scores"}],
    }
    with TestClient(build_app(ServedModel(bundle), Limits())) as client:
        served = client.post("/v2/models/sentiment/infer", json=body)
    assert served.status_code == 200, served.text
    outputs = {o["name"]: o for o in served.json()["outputs"]}
    # The same body as Triton decodes it: BYTES elements in row-major order, in the given shape.
    (tensor,) = body["inputs"]
    text = np.asarray([t.encode("utf-8") for t in tensor["data"]], dtype=object).reshape(tensor["shape"])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in())
    got = run_ensemble(bundle / "triton", "sentiment", {"text": text})
    assert [label.decode() for label in got["label"].reshape(-1)] == outputs["label"]["data"]
    np.testing.assert_allclose(got["scores"].reshape(-1), outputs["scores"]["data"], atol=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layout", "kserve"], "--layout kserve needs --kserve-storage-uri"),
        (
            ["--layout", "kserve", "--kserve-storage-uri", "ftp://x/y"],
            "is not a location KServe downloads from",
        ),
        (
            ["--layout", "kserve", "--kserve-storage-uri", "s3://a/b", "--kserve-memory", "lots"],
            "--kserve-memory takes a Kubernetes memory quantity",
        ),
        (["--kserve-cpu", "2"], "--kserve-cpu apply to the KServe InferenceService; add --layout kserve"),
        (
            ["--layout", "kserve", "--kserve-storage-uri", "s3://a/b", "--name", "9lives"],
            "cannot name an InferenceService",
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
