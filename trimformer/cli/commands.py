"""Every command of the ``trimformer`` group, registered by plain imports in pipeline order.

Adding a command is one import and one entry in :data:`COMMANDS`; a renamed or missing module is
an ImportError here rather than a command that silently disappears. ``trimformer --help`` lists the
commands in this order, so it reads like the pipeline.
"""

from __future__ import annotations

import click

from trimformer.cli.distill import distill_command
from trimformer.cli.export import export_command
from trimformer.cli.fuse import fuse_command
from trimformer.cli.generate import generate_command
from trimformer.cli.main import cli
from trimformer.cli.optimize import optimize_command
from trimformer.cli.package import package_command
from trimformer.cli.prune import prune_command
from trimformer.cli.quantize import quantize_command
from trimformer.cli.run import run_command
from trimformer.cli.serve import serve_command
from trimformer.cli.train import train_command
from trimformer.cli.trim_vocab import trim_vocab_command
from trimformer.cli.validate import validate_command
from trimformer.cli.verify import verify_command

__all__ = ["COMMANDS", "cli"]

COMMANDS: tuple[click.Command, ...] = (
    train_command,
    distill_command,
    export_command,
    fuse_command,
    prune_command,
    trim_vocab_command,
    quantize_command,
    optimize_command,
    validate_command,
    package_command,
    verify_command,
    generate_command,
    serve_command,
    run_command,
)

for _command in COMMANDS:
    cli.add_command(_command)
