"""``serve``: check everything, load and verify the bundle, then listen (uvicorn).

Order matters for the user: the options are checked, the port is bound (a port in use is one line,
exit 2) and the bundle verified and smoke-checked before the socket listens, so a bad bundle never
answers a request. SIGTERM stops accepting, finishes the requests in flight and exits 0 (uvicorn's
graceful shutdown; SIGINT still ends as an interrupt).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from trimformer.errors import UserError
from trimformer.serving.app import build_app
from trimformer.serving.model import Limits, ServedModel

__all__ = ["ServeConfig", "bind", "serve"]

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
    # Seconds a SIGTERM waits for requests in flight before closing them.
    graceful_seconds: int = 30

    def check(self) -> None:
        problems = self.limits.check()
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in [0, 65535], got {self.port}")
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


def serve(config: ServeConfig) -> None:
    """Check, bind, load and verify, then serve until SIGTERM (see the module docstring)."""
    config.check()
    # A service's own lines (start, one JSON line per request) are its output, not chatter.
    logging.getLogger("trimformer.serving").setLevel(logging.INFO)
    sock = bind(config.host, config.port)
    try:
        model = ServedModel(config.bundle, config.name, config.threads, config.expected_digest)
        app = build_app(model, config.limits)
        server = _Server(
            uvicorn.Config(
                app,
                log_level="info",
                access_log=False,  # trimformer.serving.access writes one JSON line per request
                timeout_graceful_shutdown=config.graceful_seconds,
                lifespan="off",
            )
        )
        host, port = sock.getsockname()[:2]
        logger.info("serving %s (%s, %s) on http://%s:%d", model.name, model.task, model.digest, host, port)
        server.run(sockets=[sock])
    finally:
        sock.close()
