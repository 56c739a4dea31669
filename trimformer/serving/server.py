"""``serve``: check everything, load and verify the bundle, then listen (uvicorn).

Order matters for the user: the options are checked, the port is bound (a port in use is one line,
exit 2) and the bundle verified and smoke-checked before the socket listens, so a bad bundle never
answers a request. SIGTERM stops accepting, finishes the requests in flight and exits 0 (uvicorn's
graceful shutdown; SIGINT still ends as an interrupt).
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import signal
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from uvicorn.supervisors import Multiprocess

from trimformer.errors import UserError
from trimformer.runtime.manifest import ManifestError, check_model_name
from trimformer.serving.app import build_app
from trimformer.serving.batcher import Batching
from trimformer.serving.model import Limits, ServedModel

__all__ = ["ServeConfig", "app_from_environment", "bind", "serve"]

# How a worker process (--workers N) gets the parent's settings.
ENV_CONFIG = "TRIMFORMER_SERVE_CONFIG"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    name: str | None = None
    threads: int | None = None
    expected_digest: str | None = None
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    workers: int = 1
    # Seconds a SIGTERM waits for requests in flight before closing them.
    graceful_seconds: int = 30

    def check(self) -> None:
        problems = self.limits.check() + self.batching.check()
        if self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in [0, 65535], got {self.port}")
        if self.name is not None:
            try:
                check_model_name(self.name)
            except ManifestError as exc:
                problems.append(f"--name: {exc}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be at least 1, got {self.threads}")
        if not Path(self.bundle).exists():
            problems.append(f"bundle {self.bundle} does not exist; give a bundle folder or its .tar.gz")
        if problems:
            raise UserError("; ".join(problems))


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not yet listening (a port in use is refused here)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is in use; stop what holds it or choose another --port"
            ) from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # Graceful shutdown is the expected end of a service: exit 0 rather than re-raise.
            self._captured_signals.remove(sig)


def _uvicorn_config(app: Starlette | str, config: ServeConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        factory=isinstance(app, str),
        workers=config.workers,
        log_level="info",
        access_log=False,  # trimformer.serving.access writes one JSON line per request
        timeout_graceful_shutdown=config.graceful_seconds,
        lifespan="on",  # closes the batcher's lanes when the server stops
    )


def app_from_environment() -> Starlette:
    """A worker process's app (--workers N): the parent's settings, its own model and session."""
    values = json.loads(os.environ[ENV_CONFIG])
    config = ServeConfig(
        **{**values, "limits": Limits(**values["limits"]), "batching": Batching(**values["batching"])}
    )
    logging.getLogger("trimformer.serving").setLevel(logging.INFO)
    model = ServedModel(config.bundle, config.name, config.threads, config.expected_digest)
    return build_app(model, config.limits, config.batching)


def serve(config: ServeConfig) -> None:
    """Check, bind, load and verify, then serve until SIGTERM (see the module docstring)."""
    config.check()
    if config.workers > 1 and config.threads is None:
        # Workers share the cores: each session gets its part instead of all of them.
        config = replace(config, threads=max(1, (os.cpu_count() or 1) // config.workers))
    # A service's own lines (start, one JSON line per request) are its output, not chatter.
    logging.getLogger("trimformer.serving").setLevel(logging.INFO)
    sock = bind(config.host, config.port)
    try:
        model = ServedModel(config.bundle, config.name, config.threads, config.expected_digest)
        host, port = sock.getsockname()[:2]
        logger.info("serving %s (%s, %s) on http://%s:%d", model.name, model.task, model.digest, host, port)
        if config.workers == 1:
            _Server(_uvicorn_config(build_app(model, config.limits, config.batching), config)).run(
                sockets=[sock]
            )
            return
        del model  # verified here, before listening; each worker loads its own
        os.environ[ENV_CONFIG] = json.dumps(asdict(config))
        uv_config = _uvicorn_config("trimformer.serving.server:app_from_environment", config)
        # Older uvicorn releases take the workers' entry point; newer ones run their own Server.
        target = (
            {"target": _Server(uv_config).run}
            if "target" in inspect.signature(Multiprocess).parameters
            else {}
        )
        Multiprocess(uv_config, sockets=[sock], **target).run()
    finally:
        sock.close()
