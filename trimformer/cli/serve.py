"""``trimformer serve``: a bundle over HTTP (docs/SERVING.md)."""

from __future__ import annotations

import click

from trimformer.cli.main import State, pass_state
from trimformer.cli.options import input_argument


@click.command("serve")
@input_argument("bundle", "--bundle", help="Bundle folder or .tar.gz to serve.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=int, default=8000, show_default=True, help="Port to listen on (0: any free one)."
)
@click.option(
    "--name", default=None, help="Model name in responses and URLs [default: the bundle's folder name]."
)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@click.option(
    "--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Larger request bodies get 413."
)
@click.option(
    "--max-texts", type=int, default=64, show_default=True, help="More texts in one request get 400."
)
@click.option(
    "--max-batch-size", type=int, default=32, show_default=True, help="Most texts in one onnxruntime call."
)
@click.option(
    "--max-batch-tokens",
    type=int,
    default=2048,
    show_default=True,
    help="Most padded tokens (texts x length) in one onnxruntime call; bounds a call's memory.",
)
@click.option(
    "--max-queue-delay-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="How long the oldest waiting request may wait for others (0: take what is queued).",
)
@click.option(
    "--batching/--no-batching",
    default=True,
    show_default=True,
    help="Gather concurrent requests into batches.",
)
@click.option(
    "--workers", type=int, default=1, show_default=True, help="Server processes, each with its own session."
)
@click.option(
    "--expect", "expected_digest", default=None, help="Refuse unless the bundle digest is this sha256."
)
@pass_state
def serve_command(
    state: State,
    bundle: str,
    host: str,
    port: int,
    name: str | None,
    threads: int | None,
    max_body_bytes: int,
    max_texts: int,
    max_batch_size: int,
    max_batch_tokens: int,
    max_queue_delay_ms: float,
    batching: bool,
    workers: int,
    expected_digest: str | None,
) -> None:
    """Serve BUNDLE over HTTP: health, POST /predict, the Open Inference Protocol, /metrics;
    verified before it listens; concurrent requests batched by token length.

    SIGTERM finishes the requests in flight and exits 0.

    \b
    Example:
      trimformer serve dist/sentiment.tar.gz --port 8000
      curl -s localhost:8000/predict -d '{"texts": ["what a great day"]}'
    """
    from trimformer.serving.batcher import Batching
    from trimformer.serving.model import Limits
    from trimformer.serving.server import ServeConfig, serve

    limits = Limits(max_body_bytes=max_body_bytes, max_texts=max_texts)
    batches = Batching(batching, max_batch_size, max_queue_delay_ms, max_batch_tokens)
    serve(ServeConfig(bundle, host, port, name, threads, expected_digest, limits, batches, workers))
