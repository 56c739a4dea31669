"""Registers every stage's command on the group.

Each command lives in its own module of this package and is named ``<something>_command``;
they are found here so that adding a stage never means editing a shared list.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

from trimformer.cli import __path__ as _package_path
from trimformer.cli.main import cli

_SKIP = {"main", "commands", "options"}

for _info in sorted(pkgutil.iter_modules(_package_path), key=lambda i: i.name):
    if _info.name in _SKIP:
        continue
    _module = importlib.import_module(f"{__package__}.{_info.name}")
    for _name, _value in vars(_module).items():
        if _name.endswith("_command") and isinstance(_value, click.Command):
            cli.add_command(_value)

__all__ = ["cli"]
