"""One CLI convention: every command takes its input the same way, and the group knows all its commands.

A stage's input is its first argument or the ``--model`` option (distill also ``--teacher``, verify
``--bundle``); both forms reach the command, two different values or none exit 2 with one line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.builders import make_csv
from trimformer.cli import COMMANDS, cli
from trimformer.cli.options import pick_input
from trimformer.errors import UserError

# Every command, in the order of the pipeline, as `trimformer --help` lists them.
ALL_COMMANDS = [
    "train",
    "distill",
    "export",
    "fuse",
    "prune",
    "trim-vocab",
    "quantize",
    "optimize",
    "validate",
    "package",
    "verify",
    "generate",
    "serve",
    "run",
]

# command -> (option aliases of its input, the other options it requires; DATA and OUT are filled in)
INPUT_COMMANDS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "train": (("--model",), ["--data", "DATA", "--out", "OUT"]),
    "distill": (("--teacher", "--model"), ["--data", "DATA", "--out", "OUT", "--layers", "1"]),
    "export": (("--model",), ["--out", "OUT"]),
    "fuse": (("--model",), ["--out", "OUT"]),
    "prune": (("--model",), ["--out", "OUT", "--calibration", "DATA", "--heads", "0.5"]),
    "trim-vocab": (("--model",), ["--out", "OUT", "--corpus", "DATA"]),
    "quantize": (("--model",), ["--out", "OUT", "--calibration", "DATA"]),
    "optimize": (("--model",), ["--out", "OUT", "--passes", "fp16"]),
    "validate": (("--model",), ["--data", "DATA"]),
    "package": (("--model",), ["--out", "OUT"]),
    "verify": (("--bundle",), []),
    "generate": (("--model",), ["--prompt", "hi"]),
    "serve": (("--bundle",), []),
}

FORMS = [(name, alias) for name, (aliases, _) in INPUT_COMMANDS.items() for alias in (None, *aliases)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Enough rows for a dev split, so train and distill get past the data to the model.
    return make_csv(tmp_path_factory.mktemp("conventions") / "d.csv")


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--quiet", *args])
    return result.exit_code, result.output


def others(command: str, data: Path, out: Path) -> list[str]:
    filled = {"DATA": str(data), "OUT": str(out)}
    return [filled.get(arg, arg) for arg in INPUT_COMMANDS[command][1]]


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


@pytest.mark.parametrize(("command", "alias"), FORMS, ids=[f"{c}-{a or 'positional'}" for c, a in FORMS])
def test_both_forms_reach_the_command(command: str, alias: str | None, data: Path, tmp_path: Path) -> None:
    missing = tmp_path / f"no-such-{command}"
    given = [str(missing)] if alias is None else [alias, str(missing)]
    code, out = invoke(command, *given, *others(command, data, tmp_path / "out"))
    assert code == 2, out
    # The command looked for the very path given, whichever form carried it.
    assert f"{missing} does not exist" in one_error_line(out)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", list(INPUT_COMMANDS))
def test_two_different_inputs_are_refused(command: str, data: Path, tmp_path: Path) -> None:
    alias = INPUT_COMMANDS[command][0][-1]
    code, out = invoke(command, "first", alias, "second", *others(command, data, tmp_path / "out"))
    assert code == 2, out
    line = one_error_line(out)
    assert "given twice" in line and "'first'" in line and "'second'" in line


def test_two_aliases_with_different_values_are_refused(data: Path, tmp_path: Path) -> None:
    code, out = invoke("distill", "--teacher", "a", "--model", "b", *others("distill", data, tmp_path / "o"))
    assert code == 2, out
    assert "TEACHER given twice with different values ('a' and 'b')" in one_error_line(out)


@pytest.mark.parametrize("command", list(INPUT_COMMANDS))
def test_no_input_is_refused(command: str, data: Path, tmp_path: Path) -> None:
    code, out = invoke(command, *others(command, data, tmp_path / "out"))
    assert code == 2, out
    line = one_error_line(out)
    alias = INPUT_COMMANDS[command][0][0]
    assert line.startswith("error: missing ") and f"with {alias}" in line


def test_the_same_value_in_both_forms_is_one_input() -> None:
    assert pick_input("MODEL", ("--model",), "m", ("m",)) == "m"
    assert pick_input("MODEL", ("--model",), None, ("m",)) == "m"
    assert pick_input("MODEL", ("--model",), "m", ()) == "m"
    with pytest.raises(UserError, match="missing MODEL: give it as the first argument or with --model"):
        pick_input("MODEL", ("--model",), None, ())


def test_every_input_command_declares_the_convention() -> None:
    # A new command that takes a model must take it the same way; this catches one that does not.
    for command in COMMANDS:
        if command.name == "run":
            continue  # its input is a recipe file, not a model
        assert command.name in INPUT_COMMANDS, f"{command.name}: add it to INPUT_COMMANDS"
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        options = {alias for p in command.params if isinstance(p, click.Option) for alias in p.opts}
        assert len(arguments) == 1, command.name
        assert set(INPUT_COMMANDS[command.name][0]) <= options, command.name


def test_help_lists_every_command_in_pipeline_order() -> None:
    code, out = invoke("--help")
    assert code == 0, out
    section = out.split("Commands:", 1)[1].splitlines()
    assert [line.split()[0] for line in section if line.strip()] == ALL_COMMANDS
    # The description above the list names every command too, not only a few stages.
    description = cli.help or ""
    assert all(name in description for name in ALL_COMMANDS), description


@pytest.mark.parametrize("module", ["trimformer.cli", "trimformer.cli.main"])
def test_group_has_every_command_on_a_plain_import(module: str) -> None:
    # A fresh interpreter: nothing else imported first that could register the commands.
    code = f"from {module} import cli; print(' '.join(cli.commands))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ALL_COMMANDS


def test_the_command_line_starts_without_loading_the_model_stack() -> None:
    # `trimformer --help` and `trimformer verify` must not pay for onnx, onnxruntime's tools or torch
    # (about a second on 2 cores): commands import their stage modules when they run.
    code = (
        "import sys; from trimformer.cli import cli; "
        "print(' '.join(m for m in ('onnx', 'onnx_ir', 'torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []
