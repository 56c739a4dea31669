"""Registers every stage's command on the group. Each command lives in its own module."""

from __future__ import annotations

from .export import export_command
from .main import cli
from .train import train_command
from .validate import validate_command

for command in (train_command, export_command, validate_command):
    cli.add_command(command)
