"""The model a server answers with: a verified bundle's Predictor and what a response says about it.

The same code path as :class:`~trimformer.runtime.Predictor`: its tokenizer encodes, its one
session runs, its softmax makes the labels. Requests are checked here (a list of strings, at most
``max_texts``) before anything reaches the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trimformer.runtime import Predictor
from trimformer.runtime.encoding import EncodedText
from trimformer.runtime.manifest import TensorSpec
from trimformer.serving.errors import HTTPProblem
from trimformer.serving.protocol import InferRequest, Output, datatype_of

__all__ = ["MODEL_VERSION", "TEXT_INPUT", "Limits", "ServedModel"]

# The protocol's version of the one model a server serves (a bundle is one version).
MODEL_VERSION = "1"
# The protocol input that takes texts; the graph's own inputs (token ids) are accepted too.
TEXT_INPUT = "text"


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
        self.name = name or self.predictor.spec.name or _default_name(Path(bundle))
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

    def longest_row(self) -> EncodedText:
        """A text encoded to the model's maximum length (what the start-up warm-up runs)."""
        return self.encode(["a " * (2 * self.predictor.max_length)])[0]

    def run_ids(self, feeds: dict[str, np.ndarray], max_tokens: int) -> np.ndarray:
        """Token ids a client encoded itself, as calls of at most ``max_tokens`` padded tokens."""
        ids = np.asarray(feeds.get("input_ids", ()))
        step = max(1, max_tokens // max(1, ids.shape[-1] if ids.ndim == 2 else 1))
        if ids.ndim != 2 or len(ids) <= step:
            return self.predictor.run_ids(feeds)
        parts = [
            self.predictor.run_ids(
                {name: np.asarray(value)[start : start + step] for name, value in feeds.items()}
            )
            for start in range(0, len(ids), step)
        ]
        return np.concatenate(parts)

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

    # -- the Open Inference Protocol ----------------------------------------------------------------
    def _graph_tensors(self, tensors: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [
            {"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": spec.fixed_shape}
            for spec in tensors
        ]

    def metadata(self) -> dict[str, Any]:
        """``GET /v2/models/{name}``: the text input and the graph's own inputs and outputs."""
        outputs = self._graph_tensors(self.predictor.spec.model.outputs)
        if self.task == "sequence-classification":
            width = len(self.labels)
            outputs += [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, width]},
            ]
        outputs.append({"name": "truncated", "datatype": "BOOL", "shape": [-1]})
        return {
            "name": self.name,
            "versions": [MODEL_VERSION],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]},
                *self._graph_tensors(self.predictor.spec.model.inputs),
            ],
            "outputs": outputs,
            "parameters": {"task": self.task, "digest": self.digest, "max_length": self.predictor.max_length},
        }

    def texts_of(self, request: InferRequest, limits: Limits) -> list[str] | None:
        """The request's texts (a BYTES ``text`` input of shape [n] or [n, 1]), or None when it
        sends token ids instead."""
        array = request.inputs.get(TEXT_INPUT)
        if array is None:
            return None
        extra = sorted(set(request.inputs) - {TEXT_INPUT})
        if extra:
            raise HTTPProblem(400, f"send either {TEXT_INPUT!r} or token ids, not both (also got {extra})")
        if array.dtype != np.object_ or not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
            raise HTTPProblem(400, f"input {TEXT_INPUT} must be BYTES of shape [n] or [n, 1]")
        try:
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in array.reshape(-1)]
        except UnicodeDecodeError:
            raise HTTPProblem(400, f"input {TEXT_INPUT}: a text is not UTF-8") from None
        return self.check_texts(texts, limits, TEXT_INPUT)

    def protocol_outputs(self, request: InferRequest, raw: np.ndarray, truncated: list[bool]) -> list[Output]:
        """Every output the request asked for (all of them when it named none)."""
        graph_output = self.predictor.output_name
        available: dict[str, Callable[[], np.ndarray]] = {graph_output: lambda: raw.astype(np.float32)}
        if self.task == "sequence-classification":
            predictions = self.predictor.predictions(raw)
            available["label"] = lambda: np.asarray(
                [p.label.encode() for p in predictions] + [b""], dtype=np.object_
            )[:-1]
            available["scores"] = lambda: np.asarray(
                [[p.scores[label] for label in self.labels] for p in predictions], dtype=np.float32
            ).reshape(len(predictions), len(self.labels))
        available["truncated"] = lambda: np.asarray(truncated, dtype=np.bool_)
        unknown = sorted(set(request.outputs) - set(available))
        if unknown:
            raise HTTPProblem(400, f"unknown outputs {unknown}; this model has {sorted(available)}")
        names = list(request.outputs) or list(available)
        return [Output(name, available[name]()) for name in names]

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
