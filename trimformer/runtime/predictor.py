"""Predictor: what a deployed service imports to turn texts into labels, scores or embeddings.

``Predictor(bundle)`` checks every file of the bundle (folder or ``.tar.gz``) against its manifest,
builds one onnxruntime session and one tokenizer from the verified bytes, and replays the smoke
inputs recorded at packaging time, refusing a bundle whose outputs differ. After construction the
object is never mutated, and onnxruntime's ``run`` and the tokenizer's ``encode_batch`` are safe to
call concurrently, so one Predictor serves any number of threads.

Imports: onnxruntime, numpy, tokenizers and the standard library only (no torch, onnx, pydantic).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from trimformer.errors import UserError
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.formats.tasks import TASKS as TASK_REGISTRY
from trimformer.runtime.archive import (
    canonical_archive_problem,
    check_archive_sidecar,
    extracted_bundle,
    is_archive_path,
)
from trimformer.runtime.bundle import (
    MANIFEST,
    MANIFEST_DIGEST,
    BundleError,
    VerifiedBundle,
    check_bundle_folder,
    check_expected_digest,
    read_verified,
)
from trimformer.runtime.encoding import KNOWN_INPUTS, EncodedText, TextEncoder
from trimformer.runtime.scores import probabilities
from trimformer.runtime.session import make_session, resolve_providers

__all__ = ["SMOKE_TEXTS", "Prediction", "Predictor", "open_verified", "smoke_difference"]

logger = logging.getLogger(__name__)

# Fixed inputs replayed on every load: short, long (truncated), punctuation and non-ASCII.
SMOKE_TEXTS = (
    "the service loads this bundle and checks it",
    "I really did not like how slow the delivery was, but the support team fixed it in a day! " * 12,
    "ok",
    "Café crème, s'il vous plaît — 10/10 👍",
)
# The tasks whose bundles a Predictor serves, from the task registry.
TASKS = tuple(name for name, spec in TASK_REGISTRY.items() if spec.runtime == "Predictor")


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


@contextlib.contextmanager
def open_verified(
    bundle: str | Path | VerifiedBundle, expected_digest: str | None = None
) -> Iterator[VerifiedBundle]:
    """A verified bundle folder; an archive is unpacked into a temporary folder removed afterwards.
    A bundle already verified by the caller (verify_bundle opens an archive once for two sessions)
    is only held to ``expected_digest``: every byte used is hashed again as it is read."""
    if isinstance(bundle, VerifiedBundle):
        check_expected_digest(bundle.name, bundle.digest, expected_digest)
        yield bundle
        return
    path = Path(bundle)
    if path.is_file():
        if not is_archive_path(path):
            raise BundleError(f"{path} is neither a bundle folder nor a .tar.gz bundle")
        check_archive_sidecar(path)
        with extracted_bundle(path) as unpacked:
            verified = check_bundle_folder(unpacked.folder, expected_digest)
            names = [*verified.files, MANIFEST, MANIFEST_DIGEST]
            problem = canonical_archive_problem(unpacked, names)
            if problem is not None:
                raise BundleError(
                    f"archive {path} was changed or repacked: {problem}; re-download it or verify the folder"
                )
            yield VerifiedBundle(verified.folder, verified.manifest, verified.digest, source=path)
            return
    yield check_bundle_folder(path, expected_digest)


def smoke_difference(outputs: np.ndarray, smoke: dict[str, Any]) -> float:
    """Largest absolute difference from the recorded smoke values (inf on a shape mismatch)."""
    expected = np.asarray(smoke["values"], dtype=np.float64)
    if expected.shape != outputs.shape:
        return float("inf")
    if not np.all(np.isfinite(outputs)):
        return float("inf")
    return float(np.max(np.abs(outputs.astype(np.float64) - expected), initial=0.0))


class Predictor:
    """Labels and scores (or embeddings) for texts, from a verified bundle.

    ``provider`` is a short name (cpu, cuda, ...), a full onnxruntime name or a list of them;
    ``threads`` sets onnxruntime's intra-op threads (default: its own); ``batch_size`` is how many
    texts one session call takes; ``expected_digest`` (``sha256:...`` from ``trimformer verify``)
    pins the exact bundle; ``model_format="ort"`` runs the bundle's ORT-format copy instead.
    ``bundle`` may also be a :class:`VerifiedBundle` from :func:`open_verified` (still open), to build
    several sessions from one check; the files it uses are hashed again as they are read.
    """

    def __init__(
        self,
        bundle: str | Path | VerifiedBundle,
        provider: str | list[str] = "cpu",
        threads: int | None = None,
        batch_size: int = 32,
        expected_digest: str | None = None,
        model_format: str = "onnx",
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}")
        if model_format not in ("onnx", "ort"):
            raise UserError(f"model_format must be 'onnx' or 'ort', got {model_format!r}")
        providers = resolve_providers(provider)
        self.batch_size = batch_size
        with contextlib.ExitStack() as stack:
            verified = stack.enter_context(open_verified(bundle, expected_digest))
            self.path = verified.name
            try:
                self._load(verified, providers, threads, model_format)
            except (KeyError, TypeError, IndexError, AttributeError) as exc:
                # The hashes matched, so this manifest was written (or rewritten) on purpose.
                raise BundleError(
                    f"bundle {self.path} has a manifest without a usable {exc} entry; re-package the model"
                ) from exc
        self.smoke_max_abs_diff = self._check_smoke()
        logger.info("loaded bundle %s (%s, digest %s)", bundle, self.task, self.digest)

    # -- loading ---------------------------------------------------------------------------------
    def _load(
        self, verified: VerifiedBundle, providers: list[str], threads: int | None, model_format: str
    ) -> None:
        manifest = verified.manifest
        self.manifest: dict[str, Any] = manifest
        spec = self.spec = verified.spec
        self.digest: str = verified.digest
        task = spec.task
        if task == CAUSAL_LM:
            raise BundleError(
                f"bundle {self.path} holds a causal language model; open it with Generator or `trimformer generate`"
            )
        if task not in TASKS:
            raise BundleError(f"bundle {self.path} has an unknown task {task!r}; this runtime knows {TASKS}")
        self.task: str = task
        self.labels: tuple[str, ...] = spec.labels or ()
        if task == "sequence-classification" and not self.labels:
            raise BundleError(f"bundle {self.path} is a classifier without labels; re-package it")
        input_names = [tensor.name for tensor in spec.model.inputs]
        unknown = [name for name in input_names if name not in KNOWN_INPUTS]
        if unknown:
            raise BundleError(f"bundle {self.path} has graph inputs {unknown} this runtime cannot feed")
        self.input_names = tuple(input_names)
        self.output_name: str = spec.model.outputs[0].name
        tokenizer_json = read_verified(verified, spec.tokenizer.file).decode("utf-8")
        try:
            self._encoder = TextEncoder(
                tokenizer_json, input_names, spec.tokenizer.max_length, spec.tokenizer.pad_token_id
            )
        except Exception as exc:
            raise BundleError(f"bundle {self.path} has an unreadable tokenizer: {exc}") from exc
        self.max_length = self._encoder.max_length
        self.model_format = model_format
        self.providers = providers
        if model_format == "ort":
            if not spec.ort_format:
                raise BundleError(f"bundle {self.path} has no ORT-format model; package it with --ort")
            model: bytes | Path = read_verified(verified, spec.ort_format["file"])
        elif spec.model.external_data:
            # Over 2 GB: onnxruntime must read the weights from the (verified) folder itself.
            model = verified.folder / spec.model.file
        else:
            model = read_verified(verified, spec.model.file)
        self._session: ort.InferenceSession = make_session(
            model, providers, threads, label=f"{model_format} model"
        )

    def _check_smoke(self) -> float:
        smoke = self.manifest.get("smoke")
        try:
            texts = [str(text) for text in smoke["texts"]]  # type: ignore[index]
            atol = float(smoke["atol"])  # type: ignore[index]
            np.asarray(smoke["values"], dtype=np.float64)  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"bundle {self.path} records no usable smoke outputs ({exc}); re-package it"
            ) from exc
        try:
            outputs = self.run(texts)
        except Exception as exc:  # onnxruntime's own exception types
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise BundleError(f"bundle {self.path} fails on its smoke texts: {first}") from exc
        diff = smoke_difference(outputs, smoke)  # type: ignore[arg-type]
        if not diff <= atol:
            raise BundleError(
                f"bundle {self.path} computes different outputs here than when it was packaged "
                f"(max difference {diff:.3g} > {atol:.3g} with onnxruntime {ort.__version__} on "
                f"{self.providers[0]}); validate it on this machine before serving it"
            )
        return diff

    # -- inference -------------------------------------------------------------------------------
    @staticmethod
    def _check_texts(texts: Sequence[str], what: str) -> list[str]:
        if isinstance(texts, str):
            raise TypeError(f"{what} must be a list of strings, not one string; wrap it: [text]")
        items = list(texts)
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"{what} must hold strings, got {type(item).__name__}")
        return items

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[EncodedText]:
        """Each text's tokens as the model takes them (the first step of :meth:`run`; a server
        encodes each request, batches the rows by length, and calls :meth:`infer`)."""
        items = self._check_texts(texts, "texts")
        pair_items = None if pairs is None else self._check_texts(pairs, "pairs")
        if pair_items is not None and len(pair_items) != len(items):
            raise ValueError(f"got {len(items)} texts but {len(pair_items)} pairs")
        return self._encoder.encode(items, pair_items)

    def infer(self, rows: Sequence[EncodedText]) -> np.ndarray:
        """One session call on encoded rows (padded to the longest): the graph's output, a row each."""
        if not rows:
            width = self.spec.model.outputs[0].shape[-1]
            return np.zeros((0, width if isinstance(width, int) else 0), dtype=np.float32)
        return np.asarray(self._session.run([self.output_name], self._encoder.collate(rows))[0])

    def run_ids(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph on token ids a caller encoded itself: ``input_ids`` [batch, tokens] and
        optionally ``attention_mask`` (default all ones) and ``token_type_ids`` (default zeros);
        ids outside the tokenizer's range and rows past the maximum length are refused."""
        unknown = sorted(set(feeds) - set(KNOWN_INPUTS))
        if unknown or "input_ids" not in feeds:
            raise ValueError(
                f"token inputs are input_ids and optionally attention_mask, token_type_ids; got {sorted(feeds)}"
            )
        ids = np.asarray(feeds["input_ids"])
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(
                f"input_ids must be integers of shape [batch, tokens], got {ids.dtype} {list(ids.shape)}"
            )
        if ids.shape[1] > self.max_length:
            raise ValueError(f"{ids.shape[1]} tokens per row; the model takes at most {self.max_length}")
        if ids.size and (ids.min() < 0 or ids.max() >= self._encoder.vocab_size):
            raise ValueError(f"input_ids must be in [0, {self._encoder.vocab_size})")
        defaults = {"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        arrays: dict[str, np.ndarray] = {}
        for name in self.input_names:
            value = np.asarray(feeds.get(name, defaults.get(name, ids)), dtype=np.int64)
            if value.shape != ids.shape:
                raise ValueError(f"{name} has shape {list(value.shape)} but input_ids {list(ids.shape)}")
            arrays[name] = value
        return np.asarray(self._session.run([self.output_name], arrays)[0])

    def run(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """The graph's raw output (logits or embeddings), one row per text, in batches."""
        rows = self.encode(texts, pairs)
        chunks = [
            self.infer(rows[start : start + self.batch_size])
            for start in range(0, len(rows), self.batch_size)
        ]
        return np.concatenate(chunks, axis=0) if chunks else self.infer([])

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Prediction]:
        """Label, its probability and every label's probability, for each text."""
        if self.task != "sequence-classification":
            raise UserError(f"this bundle is a {self.task} model; call embed() instead of predict()")
        return self.predictions(self.run(texts, pairs))

    def predictions(self, logits: np.ndarray) -> list[Prediction]:
        """Logits rows -> labels with their probabilities (softmax in float64)."""
        probs = probabilities(logits)
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(
                Prediction(
                    label=self.labels[best],
                    score=float(row[best]),
                    scores={label: float(p) for label, p in zip(self.labels, row, strict=True)},
                )
            )
        return out

    def embed(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Sentence embeddings, one row per text (feature-extraction bundles)."""
        if self.task != "feature-extraction":
            raise UserError(f"this bundle is a {self.task} model; call predict() instead of embed()")
        return self.run(texts, pairs)

    def describe(self) -> dict[str, Any]:
        return {
            "bundle": str(self.path),
            "digest": self.digest,
            "task": self.task,
            "labels": list(self.labels),
            "model_format": self.model_format,
            "providers": self.providers,
            "smoke_max_abs_diff": self.smoke_max_abs_diff,
        }

    def __repr__(self) -> str:
        return f"Predictor({str(self.path)!r}, task={self.task!r}, digest={self.digest[:19]!r})"
