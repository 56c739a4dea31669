"""Dynamic batching and metrics: concurrent requests share onnxruntime calls grouped by token
length, each gets its own rows back in order; /metrics counts what happened; --workers serves."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from tests.serving.test_server import TEXTS, Running, bundles, serve_process  # noqa: F401  (module fixture)
from trimformer.cli.commands import cli
from trimformer.runtime import Predictor
from trimformer.runtime.encoding import EncodedText
from trimformer.serving.batcher import Batcher, Batching
from trimformer.serving.metrics import Metrics
from trimformer.serving.model import Limits


def _row(length: int) -> EncodedText:
    return EncodedText(tuple(range(length)), (0,) * length, False)


def test_rows_are_grouped_by_length_and_returned_in_each_requests_order() -> None:
    calls, infer = _recording()

    async def main() -> list[np.ndarray]:
        batcher = Batcher(infer, Batching(max_batch_size=3, max_queue_delay_ms=200), Metrics())
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


def _recording() -> tuple[list[list[int]], Callable[[Sequence[EncodedText]], np.ndarray]]:
    calls: list[list[int]] = []

    def infer(rows: Sequence[EncodedText]) -> np.ndarray:
        calls.append([len(r) for r in rows])
        return np.asarray([[float(len(r))] for r in rows])

    return calls, infer


def test_a_call_never_passes_the_token_budget() -> None:
    calls, infer = _recording()

    async def main() -> np.ndarray:
        batcher = Batcher(infer, Batching(max_batch_size=32, max_batch_tokens=100), Metrics())
        try:
            return await batcher.submit([_row(20)] * 12)
        finally:
            batcher.close()

    out = asyncio.run(main())
    # 12 rows of 20 tokens with at most 100 padded tokens a call: 5 + 5 + 2 rows.
    assert sorted(calls, key=len) == [[20] * 2, [20] * 5, [20] * 5]
    assert out.ravel().tolist() == [20.0] * 12


def test_without_batching_concurrent_requests_never_share_a_call() -> None:
    calls, infer = _recording()

    async def main() -> list[np.ndarray]:
        batcher = Batcher(infer, Batching(enabled=False), Metrics())
        try:
            return await asyncio.gather(*(batcher.submit([_row(n)]) for n in (5, 6, 7, 8)))
        finally:
            batcher.close()

    outs = asyncio.run(main())
    assert sorted(calls) == [[5], [6], [7], [8]]
    assert [o.item() for o in outs] == [5.0, 6.0, 7.0, 8.0]


def test_warm_up_runs_the_largest_call_on_every_lane() -> None:
    calls, infer = _recording()
    batcher = Batcher(infer, Batching(max_batch_size=32, max_batch_tokens=200), Metrics(), lanes=2)
    batcher.warm_up(_row(64))
    batcher.close()
    # 200 tokens hold three rows of the model's longest 64: that call, once per lane.
    assert calls == [[64] * 3, [64] * 3]


def test_a_token_budget_below_the_models_length_is_refused_before_listening(
    bundles: dict[str, Path],  # noqa: F811
) -> None:
    result = CliRunner().invoke(
        cli, ["serve", str(bundles["classifier"]), "--port", "0", "--max-batch-tokens", "8"]
    )
    assert result.exit_code == 2
    assert "--max-batch-tokens 8 is below the model's maximum length" in result.output
    assert "Traceback" not in result.output


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
    # Every text ran once; the four texts of the second request were cut by length, alone.
    assert _metric(metrics, "trimformer_batch_size_sum") == 1 + len(TEXTS)
    assert _metric(metrics, "trimformer_batch_size_count") >= 2


def test_workers_serve_and_stop_on_sigterm(bundles: dict[str, Path]) -> None:  # noqa: F811
    process, client = serve_process(str(bundles["classifier"]), "--workers", "2")
    try:
        labels = [
            client.post("/predict", json={"texts": TEXTS}).json()["predictions"][0]["label"] for _ in range(6)
        ]
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert set(labels) == {Predictor(bundles["classifier"]).predict(TEXTS[:1])[0].label}
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
