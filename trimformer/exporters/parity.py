"""Numerical check of an exported graph against its PyTorch model, on shapes other than the traced one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from trimformer.errors import ParityError
from trimformer.sources import LoadedSource

__all__ = ["ParityResult", "check_parity", "random_feeds"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityResult:
    # "output@BxS" -> max absolute difference
    max_abs_diff: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)


def random_feeds(
    input_names: tuple[str, ...], batch: int, seq: int, vocab_size: int, seed: int, pad_token_id: int = 0
) -> dict[str, np.ndarray]:
    """Token ids with ragged real lengths, so padding and masking are exercised too."""
    rng = np.random.default_rng(seed)
    low = min(5, max(vocab_size - 1, 1))
    ids = rng.integers(low, max(vocab_size, low + 1), size=(batch, seq), dtype=np.int64)
    lengths = rng.integers(max(1, seq // 2), seq + 1, size=batch)
    lengths[0] = seq
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad_token_id)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: feeds[name] for name in input_names}


def check_parity(
    source: LoadedSource,
    session: ort.InferenceSession,
    shapes: tuple[tuple[int, int], ...],
    atol: dict[str, float],
    vocab_size: int,
    seed: int = 0,
) -> ParityResult:
    """Run both models on random inputs of each shape; raise ParityError past the tolerance."""
    diffs: dict[str, float] = {}
    names = source.io.output_names
    for index, (batch, seq) in enumerate(shapes):
        feeds = random_feeds(source.io.input_names, batch, seq, vocab_size, seed + index, source.pad_token_id)
        with torch.inference_mode():
            expected = source.module(*(torch.from_numpy(feeds[n]) for n in source.io.input_names))
        expected_list = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(list(names), feeds)
        for name, want, have in zip(names, expected_list, got, strict=True):
            diff = float(np.max(np.abs(want.float().numpy() - have))) if have.size else 0.0
            key = f"{name}@{batch}x{seq}"
            diffs[key] = diff
            logger.debug("parity %s: max abs diff %.3g", key, diff)
            if not np.isfinite(diff) or diff > atol[name]:
                raise ParityError(
                    f"export parity failed: output {name!r} at batch {batch} x {seq} tokens differs from "
                    f"PyTorch by {diff:.3g} (tolerance {atol[name]:.1g}); try another --opset or raise --atol"
                )
    return ParityResult(diffs)
