"""One onnxruntime session of a causal-LM graph, stepped with its KV cache.

:class:`CachedSession` runs the prompt once (an empty past), then each new token alone, feeding the
previous step's presents back as pasts, so the prompt is never recomputed. Rows of a batch are
left-padded: positions count real tokens only, and the attention mask grows by one column a step.
The export's greedy-token parity, the Generator and decoder validation all step through it.

``in_place`` (graphs whose attention is GroupQueryAttention: the artifact's
``formats.decoder.CACHE_IN_PLACE_KEY``): each layer's past and present are bound to one buffer
with room for more tokens, and the kernel writes each step's keys and values into it, as
onnxruntime-genai's Generator runs the model builder's graphs (``past_present_share_buffer``);
otherwise each step's presents are new tensors holding the whole cache again, a copy that grows
with the cache. A state then shares its buffer with the states stepped from it: continuing one
state once (generation, a decode-speed loop that restarts from one prompt state) is exact; two
different continuations of one state (beam search) would overwrite each other's slots.

Imports: onnxruntime, numpy and the task's graph contract only (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from trimformer.formats.decoder import DecoderSpec

__all__ = [
    "CacheState",
    "CachedSession",
    "Stepper",
    "fidelities",
    "fidelity",
    "full_pass",
    "greedy_tokens",
    "left_pad",
    "log_softmax",
]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of different lengths as ``(ids, mask)``, padded on the left."""
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        if len(row):
            ids[index, width - len(row) :] = row
            mask[index, width - len(row) :] = 1
    return ids, mask


@dataclass
class CacheState:
    """What the next step needs: the presents, the mask over every token so far, the next positions.

    The presents stay onnxruntime values: handed back as the next step's pasts without a copy into
    numpy and back (each step would otherwise copy the whole cache twice more than the graph's own
    concatenation, a cost that grows with the cache)."""

    past: dict[str, ort.OrtValue]
    mask: np.ndarray  # [batch, tokens so far]
    next_positions: np.ndarray  # [batch, 1]
    # In place: the buffers behind ``past`` ([batch, kv heads, capacity, head_dim]; capacity >= length).
    buffers: dict[str, np.ndarray] | None = None

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def _logits_layout(session: ort.InferenceSession, spec: DecoderSpec) -> tuple[int, type]:
    """The logits' last dimension as the graph declares it (a trimmed vocabulary's own, else the
    spec's) and their element type."""
    output = next(o for o in session.get_outputs() if o.name == "logits")
    width = output.shape[-1] if isinstance(output.shape[-1], int) else spec.vocab_size
    return width, np.float16 if output.type == "tensor(float16)" else np.float32


class CachedSession:
    """A causal-LM session and its graph contract (see the module docstring)."""

    # In place, a prompt's buffers have room for this many more tokens; they double when full.
    HEADROOM = 256

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec, in_place: bool = False) -> None:
        self.session = session
        self.spec = spec
        # The kernel writes into the past only where the bound buffers are its own memory: on the
        # CPU provider. Elsewhere the host buffers would be copied to the device and back, and the
        # presents would come out a token longer than the buffers bound for them.
        self.in_place = in_place and session.get_providers()[:1] == ["CPUExecutionProvider"]
        self._binding: ort.IOBinding | None = None
        self._bound: dict[str, np.ndarray] | None = None
        self._bound_past: dict[str, ort.OrtValue] = {}
        self._past_names = spec.past_names()
        self._present_names = spec.present_names()
        self._outputs = ["logits", *self._present_names]
        # Graphs that derive positions from the attention mask (onnxruntime-genai's builder) take none.
        self._takes_positions = "position_ids" in {i.name for i in session.get_inputs()}
        self._vocab, self._logits_dtype = _logits_layout(session, spec)

    def empty_past(self, batch: int) -> dict[str, ort.OrtValue]:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return {
            name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=np.float32))
            for name in self._past_names
        }

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: dict[str, ort.OrtValue]
    ) -> tuple[np.ndarray, CacheState]:
        arrays = {"input_ids": ids, "attention_mask": mask}
        if self._takes_positions:
            arrays["position_ids"] = positions
        feeds = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()
        }
        logits, *presents = self.session.run_with_ort_values(self._outputs, {**feeds, **past})
        present = {past_name: value for past_name, value in zip(self._past_names, presents, strict=True)}
        state = CacheState(present, mask, positions[:, -1:] + 1)
        return logits.numpy(), state

    def _run_in_place(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, buffers: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, CacheState]:
        # One binding per session; the cache's pasts and presents are bound again only when the
        # buffers change (a new prompt, or growth): per step, only the new token's inputs are.
        if self._binding is None or self._bound is not buffers:
            self._binding = self.session.io_binding()
            self._bound, self._bound_past = (
                buffers,
                {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in buffers.items()},
            )
            for past_name, present_name in zip(self._past_names, self._present_names, strict=True):
                self._binding.bind_ortvalue_input(past_name, self._bound_past[past_name])
                self._binding.bind_ortvalue_output(present_name, self._bound_past[past_name])
        binding = self._binding
        # The kernel writes the logits into a new array of the caller's: no copy out, and no
        # ``get_outputs()``, which wraps every bound output again (a third of a millisecond a step
        # with 60 cache tensors, measured on the 135M shape).
        logits = np.empty((*ids.shape, self._vocab), dtype=self._logits_dtype)
        binding.bind_output("logits", "cpu", 0, logits.dtype.type, list(logits.shape), logits.ctypes.data)
        arrays = {"input_ids": ids, "attention_mask": mask}
        if self._takes_positions:
            arrays["position_ids"] = positions
        for name, array in arrays.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        self.session.run_with_iobinding(binding)
        return logits, CacheState(self._bound_past, mask, positions[:, -1:] + 1, buffers)

    def _buffers(self, batch: int, length: int, state: CacheState | None = None) -> dict[str, np.ndarray]:
        """Buffers with room for ``length`` tokens: the state's own while they have it, else new
        ones (zeros, or the state's cache copied into twice the room, up to the context)."""
        if state is not None and state.buffers is not None:
            capacity = next(iter(state.buffers.values())).shape[2]
            if length <= capacity:
                return state.buffers
            room = min(max(length, 2 * capacity), self.spec.context_length)
        else:
            room = min(length + self.HEADROOM, self.spec.context_length)
        shape = (batch, self.spec.num_kv_heads, max(room, length), self.spec.head_dim)
        buffers = {name: np.zeros(shape, dtype=np.float32) for name in self._past_names}
        if state is not None and state.buffers is not None:
            kept = state.length
            for name, buffer in buffers.items():
                buffer[:, :, :kept] = state.buffers[name][:, :, :kept]
        return buffers

    def prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, CacheState]:
        """All prompt tokens in one pass; returns every position's logits and the cache."""
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        if self.in_place:
            buffers = self._buffers(ids.shape[0], ids.shape[1])
            return self._run_in_place(ids, mask.astype(np.int64), positions, buffers)
        return self._run(ids, mask.astype(np.int64), positions, self.empty_past(ids.shape[0]))

    def step(self, next_ids: np.ndarray, state: CacheState) -> tuple[np.ndarray, CacheState]:
        """One new token per row (``next_ids`` [batch, 1]) on top of the cache."""
        mask = np.concatenate([state.mask, np.ones((state.mask.shape[0], 1), dtype=np.int64)], axis=1)
        if self.in_place:
            buffers = self._buffers(mask.shape[0], mask.shape[1], state)
            return self._run_in_place(next_ids.astype(np.int64), mask, state.next_positions, buffers)
        return self._run(next_ids.astype(np.int64), mask, state.next_positions, state.past)

    def greedy(self, prompt_ids: Sequence[int], new_tokens: int) -> list[int]:
        """``new_tokens`` greedy tokens after one prompt (no stop token: parity compares them all)."""
        return greedy_tokens(self, prompt_ids, new_tokens)[0]


class Stepper(Protocol):
    """Anything with a prompt pass and cached steps, numpy in and out (ONNX or PyTorch)."""

    def prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, Any]: ...

    def step(self, next_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...


def greedy_tokens(
    stepper: Stepper, prompt_ids: Sequence[int], new_tokens: int
) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after one prompt and the prompt pass's logits [prompt, vocab]: the one greedy
    loop that export parity, validation and ``CachedSession.greedy`` share."""
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    logits, state = stepper.prompt(ids, np.ones_like(ids))
    prompt_logits = np.asarray(logits[0])
    tokens: list[int] = []
    while True:
        tokens.append(int(np.argmax(logits[0, -1])))
        if len(tokens) == new_tokens:
            return tokens, prompt_logits
        logits, state = stepper.step(np.asarray([[tokens[-1]]], dtype=np.int64), state)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def full_pass(stepper: Stepper, ids: np.ndarray) -> np.ndarray:
    """Every position's logits of one token row, in one prompt pass."""
    row = ids[None, :]
    logits, _ = stepper.prompt(row, np.ones_like(row))
    return np.asarray(logits[0])


def fidelity(
    model: Stepper, reference: Stepper, prompts: list[list[int]], new_tokens: int
) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference || model) on the reference's greedy continuations
    (teacher-forced, so one early difference does not cascade): decoder validation's token
    agreement and the decoder passes' token parity."""
    return fidelities({"model": model}, reference, prompts, new_tokens)["model"]


def fidelities(
    models: Mapping[str, Stepper], reference: Stepper, prompts: list[list[int]], new_tokens: int
) -> dict[str, dict[str, float]]:
    """:func:`fidelity` of several models against one reference, whose continuations and
    log-probabilities are computed once."""
    agree = dict.fromkeys(models, 0)
    kl = dict.fromkeys(models, 0.0)
    count = 0
    for prompt in prompts:
        continuation, _ = greedy_tokens(reference, prompt, new_tokens)
        ids = np.asarray(prompt + continuation, dtype=np.int64)
        # Positions that predict the continuation's tokens.
        span = slice(len(prompt) - 1, len(ids) - 1)
        ref_lp = log_softmax(full_pass(reference, ids)[span])
        for name, model in models.items():
            model_lp = log_softmax(full_pass(model, ids)[span])
            agree[name] += int((model_lp.argmax(-1) == ref_lp.argmax(-1)).sum())
            kl[name] += float((np.exp(ref_lp) * (ref_lp - model_lp)).sum())
        count += len(continuation)
    return {
        name: {
            "token_agreement": round(agree[name] / count, 4),
            "kl": round(kl[name] / count, 6),
            "tokens": count,
        }
        for name in models
    }
