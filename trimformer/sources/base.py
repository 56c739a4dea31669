"""What every source loader returns: a PyTorch model ready to run, export or train."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from trimformer.formats.tasks import TASK_NAMES

__all__ = ["TASKS", "LoadedSource", "SourceIO"]

# The tasks a source can be loaded for: every registered task (formats/tasks.py).
TASKS = TASK_NAMES


@dataclass(frozen=True)
class SourceIO:
    """Named inputs and outputs of the exported graph, with their dynamic axes."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # Per output: names of its axes; a name is dynamic, an int is fixed.
    output_axes: dict[str, tuple[str | int, ...]]


@dataclass
class LoadedSource:
    """A trained model loaded from disk.

    ``module`` maps the graph inputs (int64 tensors named by ``io.input_names``) to the outputs
    named by ``io.output_names``; it is what gets exported and what parity is checked against.
    ``model`` is the underlying trainable model (a Hugging Face PreTrainedModel or the plain one).
    """

    kind: str  # "hf" or "plain"
    folder: Path
    architecture: str
    task: str
    model: torch.nn.Module
    module: torch.nn.Module
    io: SourceIO
    tokenizer: Tokenizer
    labels: list[str] | None
    max_length: int
    pad_token_id: int
    config: dict[str, Any] = field(default_factory=dict)
    files_hash: str = ""

    @property
    def uses_token_type_ids(self) -> bool:
        return "token_type_ids" in self.io.input_names

    def eval(self) -> LoadedSource:
        self.model.eval()
        self.module.eval()
        return self
