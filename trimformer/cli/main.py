"""The click group, error handling and the options every command shares."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from trimformer import __version__
from trimformer.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, TrimformerError
from trimformer.progress import set_progress_enabled

__all__ = ["cli", "emit", "main", "pass_state"]

F = TypeVar("F", bound=Callable[..., Any])


class State:
    def __init__(self) -> None:
        self.debug = False
        self.json = False


pass_state = click.make_pass_decorator(State, ensure=True)


def emit(state: State, payload: dict[str, Any], human: str) -> None:
    """Print the machine-readable result with --json, else the human summary."""
    if state.json:
        click.echo(json.dumps(payload, indent=2, default=str))
    else:
        click.echo(human)


class TrimformerGroup(click.Group):
    """Turns library exceptions into one-line messages and documented exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        # Registration order (trimformer.cli.commands), which is the pipeline's, not alphabetical.
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv[1:] or bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except TrimformerError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted; nothing half-written was kept", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            message = " ".join(str(exc).split())[:400] or type(exc).__name__
            click.echo(
                f"error: internal error ({type(exc).__name__}: {message}); rerun with --debug for the traceback",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


@click.group(cls=TrimformerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trimformer")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON result.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@pass_state
def cli(state: State, debug: bool, as_json: bool, quiet: bool) -> None:
    """Turn a trained Transformer into a small, fast, validated ONNX model.

    \b
    Stages, in pipeline order; each reads a model or artifact folder and writes a new one:
      train, distill                  PyTorch: fine-tune a teacher (or train a causal LM), distil a student
      export                          PyTorch -> ONNX artifact, parity-checked
      fuse, prune, trim-vocab,        ONNX passes, each checked against its input
      quantize, optimize
      validate                        accuracy, fidelity, latency and gates with onnxruntime
      package                         artifact -> self-verifying bundle and .tar.gz
    Around them: verify rechecks a bundle; generate continues prompts with a causal LM;
    serve answers over HTTP from a bundle; run does every stage of a recipe, cached.

    Every stage takes its input as the first argument or with --model (distill also
    --teacher); verify takes BUNDLE or --bundle.

    Exit codes: 0 ok, 1 gate failed, 2 bad input, 3 internal error, 130 interrupted.
    """
    state.debug = debug
    state.json = as_json
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if quiet or as_json:
        set_progress_enabled(False)
    _quiet_libraries(debug)


def _quiet_libraries(debug: bool) -> None:
    if debug:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def main() -> None:
    """The ``trimformer`` program (and ``python -m trimformer``)."""
    # The commands are on ``cli`` already: nothing imports this module without first running the
    # package's __init__, which imports trimformer.cli.commands and so registers every command.
    cli(prog_name="trimformer")
