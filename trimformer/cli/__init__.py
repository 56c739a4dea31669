"""The ``trimformer`` command line: a thin shell that parses options and calls the library.

Exit codes: 0 ok, 1 a validation gate failed, 2 bad input or configuration, 3 internal error
(a bug: please report it with the ``--debug`` traceback), 130 interrupted.
"""

from __future__ import annotations

from trimformer.cli.main import cli, main

__all__ = ["cli", "main"]
