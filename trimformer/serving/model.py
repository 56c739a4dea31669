"""The model a server answers with: a verified bundle's Predictor and what a response says about it.

The same code path as :class:`~trimformer.runtime.Predictor`: its tokenizer encodes, its one
session runs, its softmax makes the labels. Requests are checked here (a list of strings, at most
``max_texts``) before anything reaches the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trimformer.runtime import Predictor
from trimformer.runtime.encoding import EncodedText
from trimformer.serving.errors import HTTPProblem

__all__ = ["Limits", "ServedModel"]


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_texts: int = 64

    def check(self) -> list[str]:
        problems = []
        if self.max_body_bytes < 1:
            problems.append(f"--max-body-bytes must be at least 1, got {self.max_body_bytes}")
        if self.max_texts < 1:
            problems.append(f"--max-texts must be at least 1, got {self.max_texts}")
        return problems


class ServedModel:
    """A loaded, verified, smoke-checked bundle (construction fails otherwise: then nothing serves)."""

    def __init__(
        self,
        bundle: str | Path,
        name: str | None = None,
        threads: int | None = None,
        expected_digest: str | None = None,
    ) -> None:
        self.predictor = Predictor(bundle, threads=threads, expected_digest=expected_digest)
        self.name = name or _default_name(Path(bundle))
        self.task = self.predictor.task
        self.labels = self.predictor.labels
        self.digest = self.predictor.digest

    def check_texts(self, texts: Any, limits: Limits, what: str = "texts") -> list[str]:
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise HTTPProblem(400, f"{what} must be a list of strings")
        if not texts:
            raise HTTPProblem(400, f"{what} is empty; send at least one text")
        if len(texts) > limits.max_texts:
            raise HTTPProblem(
                400, f"{len(texts)} texts in one request; at most {limits.max_texts} (--max-texts)"
            )
        return texts

    def encode(self, texts: Sequence[str]) -> list[EncodedText]:
        return self.predictor.encode(texts)

    def infer(self, rows: Sequence[EncodedText]) -> np.ndarray:
        return self.predictor.infer(rows)

    def answer(self, rows: Sequence[EncodedText], outputs: np.ndarray) -> dict[str, Any]:
        """The /predict response for encoded rows and their outputs."""
        truncated = [row.truncated for row in rows]
        if self.task == "sequence-classification":
            predictions = [
                {"label": p.label, "score": p.score, "scores": p.scores, "truncated": cut}
                for p, cut in zip(self.predictor.predictions(outputs), truncated, strict=True)
            ]
            return {"model": self.name, "predictions": predictions}
        return {"model": self.name, "embeddings": np.asarray(outputs).tolist(), "truncated": truncated}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "labels": list(self.labels),
            "digest": self.digest,
            "max_length": self.predictor.max_length,
        }


def _default_name(bundle: Path) -> str:
    name = bundle.name
    for suffix in (".tar.gz", ".tgz"):
        name = name.removesuffix(suffix)
    return name or "model"
