"""What every stage adapter hands back to the runner."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StageResult"]


@dataclass(frozen=True)
class StageResult:
    """The facts a stage's record keeps (``stage.json`` "result", read by the report).

    Facts must be the same bytes on every machine that computes the same thing: no timings, no
    absolute paths (the runner's cache compares records).
    """

    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def pick(cls, summary: Mapping[str, Any], keys: Iterable[str]) -> StageResult:
        """The named facts of a stage function's summary (those it has)."""
        return cls({key: summary[key] for key in keys if key in summary})
