"""Exceptions that reach the user, and the exit codes they map to.

::

    TrimformerError            base; never raised directly
     ├── UserError             bad input or configuration            -> exit 2
     │    └── ParityError      an export or pass changed the numbers -> exit 2
     └── GateFailed            a validation gate was missed          -> exit 1

Every message is one line that says what is wrong and what to do about it. The CLI prints it
without a traceback unless ``--debug`` is given; the library raises, never exits.
"""

from __future__ import annotations

__all__ = [
    "EXIT_GATE_FAILED",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USER_ERROR",
    "GateFailed",
    "ParityError",
    "TrimformerError",
    "UserError",
]

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class TrimformerError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        # Messages are single lines by contract: fold anything a wrapped library put on several.
        super().__init__(" ".join(str(message).split()))


class UserError(TrimformerError):
    """The input, the options or the environment are wrong; the user can fix it."""

    exit_code = EXIT_USER_ERROR


class ParityError(UserError):
    """A converted model's outputs differ from the reference by more than the tolerance."""


class GateFailed(TrimformerError):
    """A validation gate (accuracy drop, speed-up) was missed; the report still got written."""

    exit_code = EXIT_GATE_FAILED
