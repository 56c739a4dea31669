"""Dynamic batching and metrics: concurrent requests share onnxruntime calls grouped by token
length, each gets its own rows back in order; /metrics counts what happened; --workers serves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from tests.serving.test_server import TEXTS, Running, _free_port, bundles  # noqa: F401  (module fixture)
from trimformer.runtime import Predictor
from trimformer.runtime.encoding import EncodedText
from trimformer.serving.batcher import Batcher, Batching
from trimformer.serving.metrics import Metrics
from trimformer.serving.model import Limits


def _row(length: int) -> EncodedText:
    return EncodedText(tuple(range(length)), (0,) * length, False)


def test_rows_are_grouped_by_length_and_returned_in_each_requests_order() -> None:
    calls: list[list[int]] = []

    def infer(rows: Sequence[EncodedText]) -> np.ndarray:
        calls.append([len(r) for r in rows])
        return np.asarray([[float(len(r))] for r in rows])

    async def main() -> list[np.ndarray]:
        batcher = Batcher(infer, max_batch_size=3, max_queue_delay_ms=200, metrics=Metrics())
        try:
            return await asyncio.gather(
                batcher.submit([_row(30), _row(10)]), batcher.submit([_row(31), _row(11)])
            )
        finally:
            batcher.close()

    first, second = asyncio.run(main())
    # Both requests gathered (2 rows < 3), their rows sorted by length and cut where padding would
    # grow: the short rows share a call, the long ones another.
    assert sorted(calls) == [[10, 11], [30, 31]]
    assert first.ravel().tolist() == [30.0, 10.0] and second.ravel().tolist() == [31.0, 11.0]


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_concurrent_requests_share_calls_and_metrics_count_them(bundles: dict[str, Path]) -> None:  # noqa: F811
    running = Running(bundles["classifier"], Limits(max_texts=8), Batching(True, 8, 50.0))
    predictor = Predictor(bundles["classifier"])
    requests = [TEXTS[: 1 + i % 3] for i in range(12)]
    answers: dict[int, list] = {}

    def send(index: int) -> None:
        answers[index] = running.client.post("/predict", json={"texts": requests[index]}).json()[
            "predictions"
        ]

    try:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert running.client.post("/predict", content=b"{").status_code == 400
        metrics = running.client.get("/metrics").text
    finally:
        running.stop()
    for index, texts in enumerate(requests):
        assert [row["label"] for row in answers[index]] == [p.label for p in predictor.predict(texts)]
    texts_sent = sum(len(t) for t in requests)
    assert _metric(metrics, "trimformer_batch_size_sum") == texts_sent
    assert _metric(metrics, "trimformer_batch_size_count") < len(requests)  # requests shared calls
    assert _metric(metrics, 'trimformer_requests_total{path="/predict",status="200"}') == len(requests)
    assert _metric(metrics, 'trimformer_request_errors_total{path="/predict",status="400"}') == 1
    assert _metric(metrics, "trimformer_inference_seconds_count") == _metric(
        metrics, "trimformer_batch_size_count"
    )
    assert "trimformer_queue_seconds_bucket" in metrics and "trimformer_in_flight_requests" in metrics


def test_without_batching_each_request_runs_alone(bundles: dict[str, Path]) -> None:  # noqa: F811
    running = Running(bundles["classifier"], Limits(), Batching(enabled=False))
    try:
        for texts in (TEXTS[:1], TEXTS):
            assert running.client.post("/predict", json={"texts": texts}).status_code == 200
        metrics = running.client.get("/metrics").text
    finally:
        running.stop()
    assert _metric(metrics, "trimformer_batch_size_count") == 2
    assert _metric(metrics, "trimformer_batch_size_sum") == 1 + len(TEXTS)


def test_workers_serve_and_stop_on_sigterm(bundles: dict[str, Path]) -> None:  # noqa: F811
    port = _free_port()
    trimformer = str(Path(sys.executable).parent / "trimformer")
    command = [trimformer, "serve", str(bundles["classifier"]), "--port", str(port), "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
            labels = [
                client.post("/predict", json={"texts": TEXTS}).json()["predictions"][0]["label"]
                for _ in range(6)
            ]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert set(labels) == {Predictor(bundles["classifier"]).predict(TEXTS[:1])[0].label}
    finally:
        if process.poll() is None:
            process.kill()
