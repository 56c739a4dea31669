"""The server under load on loopback: overhead over the Predictor, dynamic batching, a mixed load.

    python -m bench.serve --bundle DIR_OR_TAR_GZ [--out bench/results/serve.json] [--load-seconds 60]

Measures, on the CPU it runs on (stated in the result), with `trimformer serve` in its own process
and the clients in this one (so on a 2-core machine clients and server share the cores; the
overhead and batching clients speak HTTP/1.1 by hand on keep-alive connections, because httpx
costs about a millisecond of Python per request, which the server would pay for):

1. **overhead**: one client, one text per request, sequential: the server's p50 round trip against
   ``Predictor.predict`` on the same texts in this process, rounds interleaved;
2. **batching**: 32 concurrent clients, one text per request, for ``--batch-seconds`` each round,
   a server with batching against one started with ``--no-batching`` and one batching with
   ``--threads 1`` (all alive, rounds interleaved): requests per second, p50 and p99, and the
   server's CPU milliseconds per request (2 cores' worth: how compute-bound it is);
3. **load**: 64 concurrent clients for ``--load-seconds``, one request in ten malformed (bad JSON,
   too many texts, a body over the limit, wrong types) and the rest one to four texts: every valid
   answer is compared with the Predictor's labels (or embeddings), every malformed one must get its
   status; the server's resident memory after a warm-up and at the end (growth at most 5 %), and
   whether it is still alive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from trimformer.runtime import Predictor

RESULTS = Path(__file__).parent / "results" / "serve.json"
MAX_TEXTS = 8
MAX_BODY = 64 * 1024


def _texts(limit: int) -> list[str]:
    from trimformer.data import load_dataset

    return list(load_dataset("builtin:tweets", split="test", limit=limit).texts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, bundle: str, *extra: str) -> None:
        self.port = _free_port()
        trimformer = str(Path(sys.executable).parent / "trimformer")
        command = [trimformer, "--quiet", "serve", bundle, "--port", str(self.port),
                   "--max-texts", str(MAX_TEXTS), "--max-body-bytes", str(MAX_BODY), *extra]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"server {command} did not become ready")
            time.sleep(0.2)

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


class RawClient:
    """One keep-alive HTTP/1.1 connection spoken by hand: a load generator must cost the server's
    two cores as little as possible, and httpx spends about a millisecond of Python per request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _body(texts: list[str]) -> bytes:
    return json.dumps({"texts": texts}).encode()


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 3)


def overhead(
    server: Server, predictor: Predictor, texts: list[str], rounds: int, per_round: int
) -> dict[str, Any]:
    local: list[float] = []
    remote: list[float] = []

    async def measure() -> None:
        client = RawClient(server.port)
        for text in texts[:20]:  # warm-up, both paths
            predictor.predict([text])
            await client.post("/predict", _body([text]))
        for r in range(rounds):
            chunk = texts[r * per_round : (r + 1) * per_round]
            for text in chunk:
                started = time.perf_counter()
                predictor.predict([text])
                local.append(time.perf_counter() - started)
            for text in chunk:
                body = _body([text])
                started = time.perf_counter()
                status, _ = await client.post("/predict", body)
                remote.append(time.perf_counter() - started)
                assert status == 200
        await client.close()

    asyncio.run(measure())
    return {
        "requests": len(remote),
        "predictor_p50_ms": _pct(local, 50),
        "server_p50_ms": _pct(remote, 50),
        "server_p99_ms": _pct(remote, 99),
        "overhead_p50_ms": round(_pct(remote, 50) - _pct(local, 50), 3),
    }


async def _closed_loop(port: int, clients: int, seconds: float, texts: list[str]) -> dict[str, Any]:
    """``clients`` connections, each sending its next one-text request when the last is answered."""
    latencies: list[float] = []
    bodies = [_body([text]) for text in texts]
    stop = time.perf_counter() + seconds

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        client = RawClient(port)
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status, _ = await client.post("/predict", rng.choice(bodies))
            latencies.append(time.perf_counter() - started)
            assert status == 200
        await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(seed) for seed in range(clients)))
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "per_s": len(latencies) / elapsed, "latencies": latencies}


# The servers compared under 32 clients: the default, the same with batching off, and batching on
# one intra-op thread per lane (a call per core instead of both cores on each call).
BATCHING_SERVERS = {
    "batching": (),
    "no_batching": ("--no-batching",),
    "batching_threads_1": ("--threads", "1"),
}


def _round(server: Server, texts: list[str], seconds: float) -> dict[str, Any]:
    """One closed-loop round, with the server process's CPU time per request (both cores' worth)."""
    process = psutil.Process(server.process.pid)
    before = process.cpu_times()
    run = asyncio.run(_closed_loop(server.port, 32, seconds, texts))
    after = process.cpu_times()
    cpu = after.user + after.system - before.user - before.system
    return {**run, "cpu_ms_per_request": cpu / max(1, run["requests"]) * 1e3}


def batching(bundle: str, texts: list[str], rounds: int, seconds: float) -> dict[str, Any]:
    servers = {name: Server(bundle, *extra) for name, extra in BATCHING_SERVERS.items()}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            asyncio.run(_closed_loop(server.port, 32, 2.0, texts))  # warm-up
        for _ in range(rounds):
            for name, server in servers.items():
                results[name].append(_round(server, texts, seconds))
    finally:
        for server in servers.values():
            server.stop()

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        latencies = [x for run in runs for x in run["latencies"]]
        return {
            "requests_per_s": round(statistics.median(run["per_s"] for run in runs), 1),
            "rounds_per_s": [round(run["per_s"], 1) for run in runs],
            "p50_ms": _pct(latencies, 50),
            "p99_ms": _pct(latencies, 99),
            "server_cpu_ms_per_request": round(statistics.median(r["cpu_ms_per_request"] for r in runs), 2),
        }

    out: dict[str, Any] = {name: summary(runs) for name, runs in results.items()}
    out["speedup"] = round(out["batching"]["requests_per_s"] / out["no_batching"]["requests_per_s"], 3)
    out["speedup_threads_1"] = round(
        out["batching_threads_1"]["requests_per_s"] / out["no_batching"]["requests_per_s"], 3
    )
    out["clients"] = 32
    return out


_MALFORMED: list[tuple[bytes, int]] = [
    (b'{"texts": ["unterminated', 400),
    (json.dumps({"texts": ["a"] * (MAX_TEXTS + 1)}).encode(), 400),
    (json.dumps({"texts": ["x" * (MAX_BODY + 10)]}).encode(), 413),
    (b'{"texts": [1, 2, 3]}', 400),
    (b'{"texts": "not a list"}', 400),
]


async def _mixed(
    url: str, clients: int, seconds: float, texts: list[str], expected: dict[str, Any]
) -> dict[str, Any]:
    counts = {
        "valid": 0,
        "valid_wrong": 0,
        "malformed": 0,
        "malformed_wrong_status": 0,
        "transport_errors": 0,
    }
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def one(client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < stop:
            try:
                if rng.random() < 0.1:
                    body, status = rng.choice(_MALFORMED)
                    response = await client.post(
                        "/predict", content=body, headers={"content-type": "application/json"}
                    )
                    counts["malformed"] += 1
                    counts["malformed_wrong_status"] += response.status_code != status
                    continue
                batch = rng.sample(texts, rng.randint(1, 4))
                response = await client.post("/predict", json={"texts": batch})
                counts["valid"] += 1
                counts["valid_wrong"] += response.status_code != 200 or not _matches(
                    response.json(), batch, expected
                )
            except httpx.TransportError:
                counts["transport_errors"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(client, seed) for seed in range(clients)))
    return counts


def _matches(body: dict[str, Any], batch: list[str], expected: dict[str, Any]) -> bool:
    if "predictions" in body:
        return [row["label"] for row in body["predictions"]] == [expected[t] for t in batch]
    return all(
        np.allclose(row, expected[t], atol=1e-4) for row, t in zip(body["embeddings"], batch, strict=True)
    )


def load(bundle: str, predictor: Predictor, texts: list[str], seconds: float) -> dict[str, Any]:
    if predictor.task == "sequence-classification":
        expected: dict[str, Any] = {t: p.label for t, p in zip(texts, predictor.predict(texts), strict=True)}
    else:
        expected = dict(zip(texts, predictor.embed(texts), strict=True))
    server = Server(bundle)
    try:
        asyncio.run(_mixed(server.url, 64, min(10.0, seconds / 6), texts, expected))  # warm-up
        before = server.rss()
        counts = asyncio.run(_mixed(server.url, 64, seconds, texts, expected))
        after = server.rss()
        alive = server.process.poll() is None
    finally:
        exit_code = server.stop()
    return {
        "clients": 64,
        "seconds": seconds,
        **counts,
        "rss_after_warmup_mb": round(before / 1e6, 1),
        "rss_end_mb": round(after / 1e6, 1),
        "rss_growth_pct": round(100 * (after - before) / before, 2),
        "alive_at_end": alive,
        "exit_code_on_sigterm": exit_code,
    }


def main() -> None:
    from trimformer.runtime.cpu import cpu_class, cpu_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--batch-seconds", type=float, default=10.0)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = _texts(512)
    predictor = Predictor(args.bundle)
    result: dict[str, Any] = {"cpu": cpu_name(), "cpu_class": cpu_class(), "cores": os.cpu_count(),
                              "bundle": Path(args.bundle).name, "task": predictor.task}  # fmt: skip
    server = Server(args.bundle)
    try:
        result["overhead"] = overhead(server, predictor, texts, rounds=6, per_round=50)
    finally:
        server.stop()
    print(json.dumps(result["overhead"]), flush=True)
    result["batching"] = batching(args.bundle, texts, rounds=3, seconds=args.batch_seconds)
    print(json.dumps(result["batching"]), flush=True)
    result["load"] = load(args.bundle, predictor, texts, args.load_seconds)
    print(json.dumps(result["load"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
