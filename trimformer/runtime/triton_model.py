"""The Python-backend model of a bundle's Triton repository (shipped there as ``1/model.py``).

One file, two roles, chosen by the entry's ``role`` parameter in its ``config.pbtxt``:

- ``tokenize``: ``text`` (``TYPE_STRING``, one text a row) -> the graph's int64 inputs, encoded by the
  bundle's own tokenizer with the runtime's own encoder (``trimformer_encoding.py`` beside this file
  is ``trimformer/runtime/encoding.py``, byte for byte: what ``Predictor`` and ``trimformer serve``
  run), padded to the request's longest row;
- ``scores``: a classifier's ``logits`` -> ``label`` (``TYPE_STRING``) and ``scores`` (the softmax of
  ``trimformer_scores.py``, ``trimformer/runtime/scores.py``, in float32).

It needs numpy and ``tokenizers`` in the Python backend's environment, not trimformer: the modules it
uses are the files beside it, loaded by path. ``triton_python_backend_utils`` is Triton's own module,
there only inside the server (the tests give a stand-in that follows its documented API).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ENCODING_FILE = "trimformer_encoding.py"
SCORES_FILE = "trimformer_scores.py"
SETTINGS_FILE = "trimformer_settings.json"


def _sibling(file_name: str) -> ModuleType:
    """A module shipped beside this file, loaded by its path (Triton puts no folder on sys.path)."""
    name = f"_triton_{Path(file_name).stem}_{abs(hash(str(Path(__file__).parent)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file_name))
    if spec is None or spec.loader is None:
        raise ImportError(f"{file_name} is missing beside {__file__}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize(args)`` once, ``execute(requests)`` per batch."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        self.role = config["parameters"]["role"]["string_value"]
        settings = json.loads(Path(__file__).with_name(SETTINGS_FILE).read_text(encoding="utf-8"))
        if self.role == "tokenize":
            encoding = _sibling(ENCODING_FILE)
            tokenizer = Path(__file__).with_name(settings["tokenizer_file"]).read_text(encoding="utf-8")
            self.encoder = encoding.TextEncoder(
                tokenizer, settings["input_names"], settings["max_length"], settings["pad_token_id"]
            )
        elif self.role == "scores":
            self.probabilities = _sibling(SCORES_FILE).probabilities
            self.labels = np.asarray([label.encode("utf-8") for label in settings["labels"]], dtype=object)
        else:
            raise ValueError(f"unknown role {self.role!r}: this model.py tokenizes or scores")

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; a request that fails gets its error, not the batch."""
        responses = []
        for request in requests:
            try:
                outputs = self._tokenize(request) if self.role == "tokenize" else self._score(request)
                responses.append(self._pb.InferenceResponse(output_tensors=outputs))
            except (UnicodeDecodeError, ValueError) as exc:
                responses.append(self._pb.InferenceResponse(error=self._pb.TritonError(str(exc))))
        return responses

    def _tokenize(self, request: Any) -> list[Any]:
        texts = self._pb.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        decoded = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
        feeds = self.encoder(decoded)
        return [self._pb.Tensor(name, feeds[name]) for name in self.encoder.input_names]

    def _score(self, request: Any) -> list[Any]:
        probs = self.probabilities(self._pb.get_input_tensor_by_name(request, "logits").as_numpy())
        best = probs.argmax(axis=-1)
        return [
            self._pb.Tensor("label", self.labels[best].reshape(-1, 1)),
            self._pb.Tensor("scores", probs.astype(np.float32)),
        ]

    def finalize(self) -> None:
        """Nothing to release: the tokenizer and arrays go with the object."""
