"""Decorators for what several commands share: how a command takes its input, and option groups.

Every command that reads a model (or a bundle) takes it the same way: as its first argument, or
through an option alias, because scripts already use both forms (``trimformer export MODEL`` and
``trimformer train --model MODEL``). :func:`input_argument` is the one place that rule lives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from trimformer.errors import UserError

__all__ = [
    "apply_options",
    "data_columns",
    "input_argument",
    "model_argument",
    "overwrite_option",
    "pick_input",
    "training_options",
]

F = TypeVar("F", bound=Callable[..., Any])


def apply_options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator made of several; ``--help`` lists their options in the order given."""

    def decorate(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return decorate


def pick_input(
    metavar: str, aliases: tuple[str, ...], positional: str | None, options: tuple[str, ...]
) -> str:
    """The one input value given as the argument and/or through the aliases; refuses none or two."""
    given = ([positional] if positional is not None else []) + list(options)
    how = f"as the first argument or with {aliases[0]}"
    if not given:
        raise UserError(f"missing {metavar}: give it {how}")
    distinct = list(dict.fromkeys(given))
    if len(distinct) > 1:
        values = " and ".join(repr(value) for value in distinct)
        raise UserError(f"{metavar} given twice with different values ({values}); give it once, {how}")
    return distinct[0]


def input_argument(name: str, *aliases: str, help: str, optional: bool = False) -> Callable[[F], F]:
    """The command's input as a positional ``NAME`` or any of ``aliases`` (e.g. ``--model``).

    The command function receives one keyword ``name`` either way. Neither form (unless
    ``optional``: then ``None``), or the two forms with different values, is a :class:`UserError`
    (exit 2) naming both ways to give it.
    """
    if not aliases:
        raise ValueError("input_argument needs at least one option alias, e.g. '--model'")
    metavar = name.upper()
    option_dest = f"{name}_from_option"
    option_help = f"{help} Same as the {metavar} argument."

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def with_one_input(*args: Any, **kwargs: Any) -> Any:
            positional, options = kwargs.pop(name), kwargs.pop(option_dest)
            if optional and positional is None and not options:
                kwargs[name] = None
            else:
                kwargs[name] = pick_input(metavar, aliases, positional, options)
            return fn(*args, **kwargs)

        # multiple=True so that "--teacher A --model B" is refused instead of B silently winning.
        with_option = click.option(*aliases, option_dest, multiple=True, metavar=metavar, help=option_help)(
            with_one_input
        )
        return cast(F, click.argument(name, required=False, metavar=metavar)(with_option))

    return decorate


def model_argument(help: str) -> Callable[[F], F]:
    """The input model of a stage: ``MODEL`` or ``--model MODEL``."""
    return input_argument("model", "--model", help=help)


def data_columns(fn: F) -> F:
    return apply_options(
        click.option("--text-column", default=None, help="Column holding the text [default: text]."),
        click.option("--text-pair-column", default=None, help="Second text column, for sentence pairs."),
        click.option("--label-column", default=None, help="Column holding the label [default: label]."),
    )(fn)


def _known_target(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from trimformer.formats.targets import check_target_name

    return check_target_name(value)


target_option = click.option(
    "--target",
    default="auto",
    show_default=True,
    callback=_known_target,
    help="Device to build for: x86-vnni, x86-avx2, arm64, wasm, webgpu, tensorrt, or auto (this CPU's; "
    "printed and recorded in the lineage). Every pass's output must fit its op set (docs/TARGETS.md).",
)

overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")


def training_options(
    *, steps: int, lr: float, eval_every: int, batch_help: str = "Rows per batch."
) -> Callable[[F], F]:
    """The options every PyTorch training command shares (train, distill); only defaults differ."""
    return apply_options(
        click.option("--steps", type=int, default=steps, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", type=int, default=32, show_default=True, help=batch_help),
        click.option("--max-length", type=int, default=64, show_default=True, help="Tokens per text."),
        click.option("--lr", type=float, default=lr, show_default=True, help="Peak learning rate (AdamW)."),
        click.option(
            "--warmup", type=float, default=0.1, show_default=True, help="Warm-up fraction of the steps."
        ),
        click.option(
            "--eval-every",
            type=int,
            default=eval_every,
            show_default=True,
            help="Evaluate on the dev split every N steps.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        data_columns,
        overwrite_option,
    )
