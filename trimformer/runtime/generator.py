"""Generator: text from a causal-LM artifact or bundle, with the KV cache kept between steps.

``Generator(path)`` opens a decoder artifact folder (``model.onnx`` + ``trimformer.json``) or a
packaged bundle (folder or ``.tar.gz``, verified file by file first, as ``Predictor`` does), builds
one onnxruntime session and the tokenizer, and generates for a batch of prompts at once: prompts are
left-padded, the prompt runs once, then one token per row a step on top of the cache
(:class:`~trimformer.runtime.decoding.CachedSession`), so a prompt is never recomputed.

Settings (:class:`~trimformer.runtime.sampling.GenerationSettings`): greedy or sampling with
temperature, top-k, top-p and a repetition penalty, seeded for reproducible draws; stop tokens
(the model's eos tokens and any given), stop strings (cut from the text), ``max_new_tokens``, and a
streaming callback that receives each row's new text as it is decoded. Generation of a row also
stops when the context is full (``finish_reason="length"``).

Imports: onnxruntime, numpy, tokenizers and the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from trimformer.errors import UserError
from trimformer.formats.decoder import CACHE_IN_PLACE_KEY, DECODER_EXTRAS_KEY, DecoderSpec
from trimformer.formats.tasks import CAUSAL_LM
from trimformer.runtime.bundle import MANIFEST, VerifiedBundle, read_verified
from trimformer.runtime.decoder_smoke import check_decoder_smoke
from trimformer.runtime.decoding import CachedSession, CacheState, left_pad
from trimformer.runtime.predictor import open_verified
from trimformer.runtime.sampling import GenerationSettings, next_token
from trimformer.runtime.session import make_session, resolve_providers

__all__ = ["Generation", "GenerationSettings", "Generator"]

logger = logging.getLogger(__name__)

ARTIFACT_META = "trimformer.json"
StreamCallback = Callable[[int, str], None]  # (row, new text)


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos, stop token or stop string), "length" (max_new_tokens or context)
    # Seconds of the prompt pass and of each decode step (shared by the batch's rows).
    prompt_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)


@dataclass
class _Row:
    prompt: str
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    streamed: int = 0  # characters of text already handed to the callback
    finish: str | None = None


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / ARTIFACT_META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is not a model artifact or bundle ({ARTIFACT_META}: {exc})") from exc
    if not isinstance(meta, dict):
        raise UserError(f"{folder / ARTIFACT_META} must hold a JSON object")
    return meta


class Generator:
    """See the module docstring. ``provider`` and ``threads`` as for ``Predictor``."""

    def __init__(
        self,
        path: str | Path | VerifiedBundle,
        provider: str | list[str] = "cpu",
        threads: int | None = None,
        expected_digest: str | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}")
        providers = resolve_providers(provider)
        self.path = path.name if isinstance(path, VerifiedBundle) else Path(path)
        if not self.path.exists():
            raise UserError(f"model path {self.path} does not exist")
        self.digest: str | None = None
        self.smoke_max_abs_diff: float | None = None
        try:
            with contextlib.ExitStack() as stack:
                verified = self._verified(path, expected_digest, stack)
                if verified is None:
                    self._load_folder(providers, threads)
                else:
                    self._load_bundle(verified, providers, threads)
        except (KeyError, TypeError, OSError) as exc:
            # A trimformer.json (or manifest) written by hand or cut short: one line, not a traceback.
            raise UserError(
                f"{self.path} has no usable decoder description ({type(exc).__name__}: {exc}); re-export the model"
            ) from exc
        self.providers = providers
        logger.info("loaded decoder %s (%s, %d layers)", self.path, self.spec.family, self.spec.num_layers)

    def _verified(
        self, path: str | Path | VerifiedBundle, expected_digest: str | None, stack: contextlib.ExitStack
    ) -> VerifiedBundle | None:
        """The checked bundle to load from, or None for an artifact folder."""
        if isinstance(path, VerifiedBundle) or self.path.is_file() or (self.path / MANIFEST).is_file():
            return stack.enter_context(open_verified(path, expected_digest))
        return None

    def _load_folder(self, providers: list[str], threads: int | None) -> None:
        meta = _read_meta(self.path)
        self._check_task(meta)
        tokenizer = (self.path / meta["tokenizer"]["file"]).read_bytes()
        self._setup(meta, tokenizer, self.path / "model.onnx", providers, threads)
        self.default_settings = GenerationSettings.from_hf_config(meta["extras"].get("generation") or {})

    def _load_bundle(self, verified: VerifiedBundle, providers: list[str], threads: int | None) -> None:
        self.digest = verified.digest
        manifest = verified.manifest
        meta = json.loads(read_verified(verified, ARTIFACT_META))
        self._check_task(meta)
        tokenizer = read_verified(verified, meta["tokenizer"]["file"])
        model_spec = verified.spec.model
        # Over 2 GB, onnxruntime reads the weights from the (verified) folder itself.
        model: bytes | Path = (
            verified.folder / model_spec.file
            if model_spec.external_data
            else read_verified(verified, model_spec.file)
        )
        self._setup(meta, tokenizer, model, providers, threads)
        self.default_settings = GenerationSettings.from_dict(
            manifest.get("generation") or {}, f"bundle {verified.name} manifest"
        )
        self.smoke_max_abs_diff = check_decoder_smoke(
            self.session, self.encode, manifest.get("smoke"), str(verified.name)
        )

    def _setup(
        self,
        meta: dict[str, Any],
        tokenizer: bytes,
        model: bytes | Path,
        providers: list[str],
        threads: int | None,
    ) -> None:
        self.spec = DecoderSpec.from_dict(meta["extras"][DECODER_EXTRAS_KEY], str(self.path))
        self.tokenizer = Tokenizer.from_str(tokenizer.decode("utf-8"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.pad_token_id = int(meta["tokenizer"]["pad_token_id"])
        session = make_session(model, providers, threads, label="decoder")
        self.session = CachedSession(
            session, self.spec, in_place=bool(meta["extras"].get(CACHE_IN_PLACE_KEY))
        )

    def _check_task(self, meta: dict[str, Any]) -> None:
        task = meta.get("task")
        if task != CAUSAL_LM:
            raise UserError(
                f"{self.path} is a {task} model; generation takes a causal language model "
                "(use Predictor or `trimformer validate` for encoders)"
            )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.spec.eos_token_ids)

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        settings: GenerationSettings | None = None,
        on_text: StreamCallback | None = None,
        **overrides: Any,
    ) -> list[Generation]:
        """Generate for each prompt (one string, or a list as one left-padded batch); ``settings``
        default to the bundle's (or the artifact's generation_config.json), ``overrides`` change
        single fields."""
        settings = replace(settings or self.default_settings, **overrides)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            return []
        rows = [_Row(text, self.encode(text)) for text in texts]
        ids, mask = left_pad([row.prompt_ids for row in rows], self.pad_token_id)
        rng = np.random.default_rng(settings.seed)
        stops = set(self.eos_token_ids) | set(settings.stop_tokens)
        started = time.perf_counter()
        logits, state = self.session.prompt(ids, mask)
        prompt_seconds = time.perf_counter() - started
        step_seconds: list[float] = []
        while True:
            chosen = self._choose(rows, logits[:, -1], settings, stops, rng, state, on_text)
            if all(row.finish for row in rows):
                break
            started = time.perf_counter()
            logits, state = self.session.step(chosen, state)
            step_seconds.append(time.perf_counter() - started)
        if not settings.stop_strings and on_text is None:
            for row in rows:
                row.text = self.tokenizer.decode(row.tokens)
        return [
            Generation(row.prompt, row.text, row.tokens, len(row.prompt_ids), row.finish or "length",
                       prompt_seconds, step_seconds)
            for row in rows
        ]  # fmt: skip

    def encode(self, text: str) -> list[int]:
        """A prompt's token ids, as generation feeds them (refused if it fills the context)."""
        if not isinstance(text, str):
            raise TypeError(f"prompts must be strings, got {type(text).__name__}")
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise UserError("an empty prompt has no tokens to continue; give some text")
        if len(ids) >= self.spec.context_length:
            raise UserError(
                f"a prompt of {len(ids)} tokens leaves no room in the model's context of "
                f"{self.spec.context_length} tokens; shorten it"
            )
        return ids

    def _choose(
        self,
        rows: list[_Row],
        last: np.ndarray,
        settings: GenerationSettings,
        stops: set[int],
        rng: np.random.Generator,
        state: CacheState,
        on_text: StreamCallback | None,
    ) -> np.ndarray:
        """Each unfinished row's next token, its stop checks and streaming; [batch, 1] to feed."""
        chosen = np.full((len(rows), 1), self.pad_token_id, dtype=np.int64)
        context_full = state.length >= self.spec.context_length
        for index, row in enumerate(rows):
            if row.finish:
                continue
            token = next_token(last[index], np.asarray(row.prompt_ids + row.tokens), settings, rng)
            chosen[index, 0] = token
            if token in stops:
                row.finish = "stop"
            else:
                row.tokens.append(token)
                if settings.stop_strings or on_text is not None:  # else the text is decoded once, at the end
                    row.text = self.tokenizer.decode(row.tokens)
                    self._apply_stop_strings(row, settings.stop_strings)
            if not row.finish and (len(row.tokens) >= settings.max_new_tokens or context_full):
                row.finish = "length"
            if on_text is not None:
                self._stream(index, row, settings.stop_strings, on_text)
        return chosen

    @staticmethod
    def _apply_stop_strings(row: _Row, stop_strings: tuple[str, ...]) -> None:
        cuts = [row.text.find(stop) for stop in stop_strings if stop in row.text]
        if cuts:
            row.text = row.text[: min(cuts)]
            row.finish = "stop"

    @staticmethod
    def _stream(index: int, row: _Row, stop_strings: tuple[str, ...], on_text: StreamCallback) -> None:
        """Hand over the text that is final: while a row runs, hold back a tail that could still
        turn out to start a stop string (or be a partial multi-byte character)."""
        ready = len(row.text)
        if not row.finish:
            ready = len(row.text.rstrip("\ufffd"))
            held = 0
            for stop in stop_strings:
                for size in range(min(len(stop) - 1, ready), 0, -1):
                    if row.text[:ready].endswith(stop[:size]):
                        held = max(held, size)
                        break
            ready -= held
        if ready > row.streamed:
            on_text(index, row.text[row.streamed : ready])
            row.streamed = ready
