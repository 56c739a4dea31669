"""The ``trimformer`` command line: a thin shell that parses options and calls the library.

``from trimformer.cli import cli`` is the whole group: importing this package imports
:mod:`trimformer.cli.commands`, which registers every command on it.

Exit codes: 0 ok, 1 a validation gate failed, 2 bad input or configuration, 3 internal error
(a bug: please report it with the ``--debug`` traceback), 130 interrupted.
"""

from __future__ import annotations

from trimformer.cli.commands import COMMANDS, cli
from trimformer.cli.main import main

__all__ = ["COMMANDS", "cli", "main"]
