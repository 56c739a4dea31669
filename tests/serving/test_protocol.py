"""The Open Inference Protocol, driven by Triton's own HTTP client (binary and JSON tensors) and by
httpx: health, metadata with the real io, texts or token ids in, answers equal to the Predictor's,
and every malformed message refused with its status."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from tests.serving.test_server import TEXTS, Running, bundles  # noqa: F401  (module fixture)
from trimformer.runtime import Predictor
from trimformer.serving.model import Limits, ServedModel
from trimformer.serving.protocol import InferRequest, Output, encode_response, parse_request


@pytest.fixture(scope="module")
def served(bundles: dict[str, Path]) -> Iterator[tuple[Running, triton.InferenceServerClient, Predictor]]:  # noqa: F811
    running = Running(bundles["classifier"], Limits(max_body_bytes=1 << 16, max_texts=8))
    client = triton.InferenceServerClient(url=f"127.0.0.1:{running.port}")
    yield running, client, Predictor(bundles["classifier"])
    client.close()
    running.stop()


def _text_input(texts: list[str], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.asarray([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    return tensor


def test_health_and_metadata_through_tritonclient(served: tuple) -> None:
    _, client, predictor = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("sentiment")
    metadata = client.get_model_metadata("sentiment")
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]}
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert inputs["text"] == ("BYTES", [-1])
    assert inputs["input_ids"] == ("INT64", [-1, -1]) and set(inputs) == {"text", *predictor.input_names}
    assert outputs["logits"] == ("FP32", [-1, 3]) and outputs["scores"] == ("FP32", [-1, 3])
    assert outputs["label"] == ("BYTES", [-1]) and metadata["versions"] == ["1"]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize("binary", [True, False])
def test_texts_in_labels_and_scores_out_equal_the_predictor(served: tuple, binary: bool) -> None:
    _, client, predictor = served
    outputs = (
        None if binary else [triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "scores")]
    )
    result = client.infer("sentiment", [_text_input(TEXTS, binary)], outputs=outputs, request_id="r1")
    expected = predictor.predict(TEXTS)
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]  # JSON: str
    assert labels == [p.label for p in expected]
    scores = np.asarray([[p.scores[label] for label in predictor.labels] for p in expected])
    np.testing.assert_allclose(result.as_numpy("scores"), scores, rtol=1e-5, atol=1e-7)
    assert result.get_response()["id"] == "r1"
    if binary:
        np.testing.assert_allclose(result.as_numpy("logits"), predictor.run(TEXTS), rtol=1e-5, atol=1e-6)
        assert result.as_numpy("truncated").tolist() == [False] * len(TEXTS)


def test_token_ids_in_logits_out(served: tuple, bundles: dict[str, Path]) -> None:  # noqa: F811
    _, client, predictor = served
    rows = predictor.encode(TEXTS)
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row.ids
        mask[index, : len(row)] = 1
    tensors = []
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = client.infer("sentiment", tensors, outputs=[triton.InferRequestedOutput("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), predictor.run(TEXTS), rtol=1e-5, atol=1e-6)
    # Over the token budget, the rows run as several calls with the same answer.
    model = ServedModel(bundles["classifier"])
    calls: list[int] = []
    run_ids = model.predictor.run_ids
    model.predictor.run_ids = lambda feeds: calls.append(len(feeds["input_ids"])) or run_ids(feeds)  # type: ignore[method-assign]
    split = model.run_ids({"input_ids": ids, "attention_mask": mask}, max_tokens=2 * width)
    assert calls == [2, 2]
    np.testing.assert_allclose(split, predictor.run(TEXTS), rtol=1e-5, atol=1e-6)


def test_feature_extraction_through_tritonclient(bundles: dict[str, Path]) -> None:  # noqa: F811
    running = Running(bundles["embedder"], Limits())
    client = triton.InferenceServerClient(url=f"127.0.0.1:{running.port}")
    try:
        result = client.infer("embedder", [_text_input(TEXTS, True)])
        names = {o["name"] for o in client.get_model_metadata("embedder")["outputs"]}
    finally:
        client.close()
        running.stop()
    expected = Predictor(bundles["embedder"]).embed(TEXTS)
    np.testing.assert_allclose(result.as_numpy("sentence_embedding"), expected, rtol=1e-5, atol=1e-6)
    assert names == {"sentence_embedding", "truncated"}


def _json(
    name: str = "text", datatype: str = "BYTES", shape: list | None = None, data: list | None = None
) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [1], "data": data or ["hi"]}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("/v2/models/other/infer", _json(), 404, "unknown model 'other'"),
        ("/v2/models/sentiment/versions/2/infer", _json(), 404, "version 1 only"),
        ("/v2/models/sentiment/infer", {"inputs": []}, 400, "non-empty 'inputs'"),
        ("/v2/models/sentiment/infer", _json(datatype="STRING"), 400, "unknown datatype"),
        ("/v2/models/sentiment/infer", _json(shape=[2]), 400, "1 values for shape [2]"),
        ("/v2/models/sentiment/infer", _json(shape=[-1]), 400, "non-negative integers"),
        ("/v2/models/sentiment/infer", _json(shape=[9], data=["a"] * 9), 400, "at most 8"),
        (
            "/v2/models/sentiment/infer",
            _json("input_ids", "INT64", [1, 2], [1, 10**9]),
            400,
            "input_ids must be in",
        ),
        (
            "/v2/models/sentiment/infer",
            _json("input_ids", "FP32", [1, 2], [1.5, 2.0]),
            400,
            "must be integers",
        ),
        ("/v2/models/sentiment/infer", _json("pixels", "INT64", [1, 1], [1]), 400, "token inputs are"),
        (
            "/v2/models/sentiment/infer",
            {**_json(), "outputs": [{"name": "probabilities"}]},
            400,
            "unknown outputs ['probabilities']",
        ),
        (
            "/v2/models/sentiment/infer",
            {"inputs": [*_json()["inputs"], *_json("input_ids", "INT64", [1, 1], [5])["inputs"]]},
            400,
            "either 'text' or token ids",
        ),
    ],
)
def test_malformed_infer_requests(served: tuple, path: str, body: dict, status: int, reason: str) -> None:
    running, _, _ = served
    response = running.client.post(path, json=body)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"] and "Traceback" not in response.text


def test_binary_sizes_that_do_not_fit_are_refused(served: tuple) -> None:
    running, _, _ = served
    head = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}'
    body = head + struct.pack("<I", 10) + b"hello"
    response = running.client.post(
        "/v2/models/sentiment/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 400 and "ends early" in response.json()["error"]
    response = running.client.post(
        "/v2/models/sentiment/infer", content=head, headers={"Inference-Header-Content-Length": "99999"}
    )
    assert response.status_code == 400 and "does not fit the body" in response.json()["error"]


def test_codec_round_trip() -> None:
    texts = np.asarray(["añb".encode(), b"", b"x" * 300], dtype=np.object_)
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    request = InferRequest("7", {}, {"t": True, "i": False})
    body, header = encode_response("m", "1", request, [Output("t", texts), Output("i", ints)])
    assert header is not None  # 3 lengths of 4 bytes + 4 + 0 + 300 bytes of text
    head = body[:header].decode()
    assert '"data": [0, 1, 2, 3, 4, 5]' in head and '"binary_data_size": 316' in head
    # The response's binary section is what a request's would be: read it back as one.
    again = head.replace('"outputs"', '"inputs"').encode()
    parsed = parse_request(again + body[header:], str(len(again)))
    assert parsed.inputs["t"].tolist() == texts.tolist()
    assert parsed.inputs["i"].tolist() == ints.tolist()
