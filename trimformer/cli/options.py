"""Option groups shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

__all__ = ["data_columns", "overwrite_option"]


def data_columns(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--text-column", default=None, help="Column holding the text [default: text]."),
            click.option("--text-pair-column", default=None, help="Second text column, for sentence pairs."),
            click.option("--label-column", default=None, help="Column holding the label [default: label]."),
        ]
    ):
        fn = option(fn)
    return fn


overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
