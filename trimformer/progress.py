"""Progress bars for long work (training, calibration, benchmarking), on stderr.

Library code asks for a bar through :func:`progress_bar`; the CLI decides whether bars are shown
(``--quiet`` turns them off), so tests and machine-readable runs stay clean.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["progress_bar", "progress_enabled", "set_progress_enabled"]

_enabled = os.environ.get("TRIMFORMER_PROGRESS", "1") != "0"


def set_progress_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    """Whether bars are shown (child processes, such as torchrun's, are told the same)."""
    return _enabled


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Progress]:
    """A rich progress bar with a free-text ``info`` field for losses and metrics."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        disable=not _enabled,
        transient=False,
    )
    with progress:
        progress.add_task(description, total=total, info="")
        yield progress
