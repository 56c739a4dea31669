"""`trimformer serve`: a real uvicorn server on a loopback port, driven by httpx; answers equal the
Predictor's; limits, errors and the start-up checks; SIGTERM finishes in-flight requests, exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner

from tests.builders import make_hf_model
from trimformer.cli.commands import cli
from trimformer.exporters import export_model
from trimformer.packaging.package import package_artifact
from trimformer.runtime import Predictor
from trimformer.serving import app as app_module
from trimformer.serving.app import build_app
from trimformer.serving.batcher import Batching
from trimformer.serving.model import Limits, ServedModel
from trimformer.serving.server import bind

TEXTS = ["what a great day", "this is the worst phone ever", "ok", "Der Zug ist wieder zu spät"]


@pytest.fixture(scope="module")
def bundles(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    package_artifact(tiny_bert_onnx, root / "sentiment")
    source = make_hf_model(root / "src", task="feature-extraction", pooling="mean")
    export_model(source, root / "embed-onnx")
    package_artifact(root / "embed-onnx", root / "embedder")
    return {"classifier": root / "sentiment.tar.gz", "embedder": root / "embedder"}


class Running:
    """A server in a thread on a free loopback port; stopped as uvicorn stops on SIGTERM."""

    def __init__(self, bundle: Path, limits: Limits, batching: Batching | None = None) -> None:
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        app = build_app(ServedModel(bundle), limits, batching)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def classifier(bundles: dict[str, Path]) -> Iterator[Running]:
    running = Running(bundles["classifier"], Limits(max_body_bytes=4096, max_texts=8))
    yield running
    running.stop()


def test_predict_equals_the_predictor(classifier: Running, bundles: dict[str, Path]) -> None:
    response = classifier.client.post("/predict", json={"texts": TEXTS})
    assert response.status_code == 200
    rows = response.json()["predictions"]
    expected = Predictor(bundles["classifier"]).predict(TEXTS)
    assert [r["label"] for r in rows] == [p.label for p in expected]
    np.testing.assert_allclose([r["score"] for r in rows], [p.score for p in expected], rtol=1e-6)
    assert response.json()["model"] == "sentiment" and not any(r["truncated"] for r in rows)


def test_the_model_name_comes_from_the_manifest_then_the_folder(
    tiny_bert_onnx: Path, tmp_path: Path, bundles: dict[str, Path]
) -> None:
    package_artifact(tiny_bert_onnx, tmp_path / "dist" / "bundle", name="tweets-sentiment")
    assert ServedModel(tmp_path / "dist" / "bundle.tar.gz").name == "tweets-sentiment"
    assert ServedModel(tmp_path / "dist" / "bundle", name="other").name == "other"
    assert ServedModel(bundles["classifier"]).name == "sentiment"  # packaged without a name


def test_long_requests_are_tokenized_off_the_event_loop(bundles: dict[str, Path]) -> None:
    model = ServedModel(bundles["classifier"])
    threads: list[str] = []
    encode = model.encode

    def recording(texts: list[str]) -> list:
        threads.append(threading.current_thread().name)
        return encode(texts)

    model.encode = recording  # type: ignore[method-assign]
    short, long = ["a short tweet"], ["word " * 300] * 4
    rows = asyncio.run(app_module.encode(model, short)) + asyncio.run(app_module.encode(model, long))
    assert threads[0] == threading.main_thread().name and threads[1] != threading.main_thread().name
    assert [len(r) for r in rows] == [len(r) for r in encode(short + long)]


def test_health(classifier: Running) -> None:
    assert classifier.client.get("/v2/health/live").json() == {"live": True}
    ready = classifier.client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


def test_a_long_text_is_truncated_and_says_so(classifier: Running) -> None:
    long = " ".join(["word"] * 400)
    rows = classifier.client.post("/predict", json={"texts": [long, "short"]}).json()["predictions"]
    assert [r["truncated"] for r in rows] == [True, False]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"texts": "one string"}', 400, "list of strings"),
        (b'{"texts": [1, 2]}', 400, "list of strings"),
        (b'{"texts": []}', 400, "empty"),
        (b'{"texts": ["a"], "extra": 1}', 400, "unknown keys"),
        (json.dumps({"texts": ["a"] * 9}).encode(), 400, "at most 8"),
        (json.dumps({"texts": ["a" * 5000]}).encode(), 413, "at most 4096"),
    ],
)
def test_bad_requests_get_their_status_and_one_line(
    classifier: Running, body: bytes, status: int, reason: str
) -> None:
    response = classifier.client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert reason in error and "\n" not in error and "Traceback" not in response.text


def test_a_chunked_body_over_the_limit_is_cut_off_while_reading(classifier: Running) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"texts": ["'
        for _ in range(100):
            yield b"a" * 100
        yield b'"]}'

    response = classifier.client.post("/predict", content=chunks())
    assert response.status_code == 413 and "passes 4096 bytes" in response.json()["error"]


def _http_exchange(sock: socket.socket, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send one request (the body in parts, a pause between them) and read one whole response."""
    sock.sendall(head)
    for part in body_parts:
        time.sleep(0.1)
        sock.sendall(part)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(line for line in header.split(b"\r\n") if line.lower().startswith(b"content-length")).split(
            b":"
        )[1]
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return header + b"\r\n\r\n" + rest


def test_a_client_still_sending_an_oversized_body_gets_its_413_and_keeps_the_connection(
    classifier: Running,
) -> None:
    """The 413 is answered from the declared length; the rest of the body the client is still
    sending is read and dropped, so the keep-alive connection serves the next request."""
    body = json.dumps({"texts": ["a" * 5000]}).encode()
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    valid = json.dumps({"texts": ["good phone"]}).encode()
    valid_head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(valid)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", classifier.port), timeout=10) as sock:
        first = _http_exchange(sock, head.encode(), [body[:2000], body[2000:]])
        assert first.startswith(b"HTTP/1.1 413") and b"at most 4096" in first
        second = _http_exchange(sock, valid_head.encode(), [valid])
        assert second.startswith(b"HTTP/1.1 200") and b"predictions" in second


def test_an_internal_error_is_500_without_a_traceback(
    classifier: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = classifier.server.config.app.state.model

    def broken(rows: object) -> None:
        raise RuntimeError("secret detail /home/user/model.onnx")

    monkeypatch.setattr(model, "infer", broken)
    response = classifier.client.post("/predict", json={"texts": ["a"]})
    assert response.status_code == 500 and response.json() == {"error": "internal error"}


def test_feature_extraction_bundle_answers_embeddings(bundles: dict[str, Path]) -> None:
    running = Running(bundles["embedder"], Limits())
    try:
        body = running.client.post("/predict", json={"texts": TEXTS}).json()
    finally:
        running.stop()
    expected = Predictor(bundles["embedder"]).embed(TEXTS)
    np.testing.assert_allclose(np.asarray(body["embeddings"]), expected, rtol=1e-5, atol=1e-6)
    assert body["truncated"] == [False] * len(TEXTS)


def test_start_up_refusals_are_one_line_exit_2(bundles: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    tampered = tmp_path / "tampered"
    shutil.copytree(bundles["embedder"], tampered)
    (tampered / "tokenizer.json").write_text("{}")
    holder = bind("127.0.0.1", 0)
    holder.listen()  # a port another server listens on
    busy = str(holder.getsockname()[1])
    try:
        cases = [
            (["serve", str(tampered)], "tokenizer.json"),
            (["serve", str(tmp_path / "missing.tar.gz")], "does not exist"),
            (["serve", str(bundles["embedder"]), "--port", busy], "is in use"),
            (["serve", str(bundles["embedder"]), "--max-texts", "0"], "--max-texts must be at least 1"),
            (
                ["serve", str(bundles["embedder"]), "--max-body-bytes", "0"],
                "--max-body-bytes must be at least 1",
            ),
        ]
        for args, message in cases:
            result = runner.invoke(cli, args)
            assert result.exit_code == 2, (args, result.output)
            assert message in result.output and "Traceback" not in result.output
    finally:
        holder.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_process(*args: str) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    """``trimformer serve ARGS`` in its own process on a free port, once it answers ready."""
    port = _free_port()
    trimformer = str(Path(sys.executable).parent / "trimformer")
    command = [trimformer, "serve", *args, "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 90
    while True:
        try:
            if client.get("/v2/health/ready").status_code == 200:
                return process, client
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            client.close()
            raise AssertionError(process.stdout.read().decode())  # type: ignore[union-attr]
        time.sleep(0.1)


def test_sigterm_finishes_requests_in_flight_and_exits_0(bundles: dict[str, Path]) -> None:
    process, client = serve_process(str(bundles["classifier"]))
    try:
        answers: list[httpx.Response] = []
        requests = [
            threading.Thread(
                target=lambda: answers.append(client.post("/predict", json={"texts": TEXTS * 16}))
            )
            for _ in range(4)
        ]
        for thread in requests:
            thread.start()
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        for thread in requests:
            thread.join(30)
        client.close()
        assert process.wait(30) == 0
        assert len(answers) == 4 and all(a.status_code == 200 for a in answers)
        log = process.stdout.read().decode()  # type: ignore[union-attr]
        access = [
            json.loads(line[line.index("{") :]) for line in log.splitlines() if '"path": "/predict"' in line
        ]
        assert len(access) == 4 and all(entry["status"] == 200 and entry["ms"] > 0 for entry in access)
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
