"""The one place an exception becomes an HTTP status and a one-line reason.

A response never carries a traceback: a request the server cannot understand gets its status and a
reason; anything unexpected is logged here with its traceback and answered 500 "internal error".
"""

from __future__ import annotations

import logging

from trimformer.errors import UserError

__all__ = ["HTTPProblem", "status_and_reason"]

logger = logging.getLogger(__name__)


class HTTPProblem(Exception):
    """A request refused with ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = " ".join(reason.split())


def status_and_reason(exc: BaseException) -> tuple[int, str]:
    """HTTPProblem: its own; UserError or a wrong value in the request: 400; anything else: 500."""
    if isinstance(exc, HTTPProblem):
        return exc.status, exc.reason
    if isinstance(exc, (UserError, ValueError, TypeError)):
        return 400, " ".join(str(exc).split()) or type(exc).__name__
    logger.error("internal error while serving a request", exc_info=exc)
    return 500, "internal error"
