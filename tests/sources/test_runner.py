"""TorchRunner: a PyTorch source run like an onnxruntime model, as validation's reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trimformer.data import Encoder
from trimformer.sources import load_source
from trimformer.sources.runner import TorchRunner


def test_runs_the_source_with_its_threads_and_restores_torchs(tiny_bert: Path) -> None:
    source = load_source(tiny_bert)
    encoder = Encoder(source.tokenizer, source.io.input_names, source.max_length, source.pad_token_id)
    feeds = encoder(["good phone", "bad battery life"])
    before = torch.get_num_threads()
    runner = TorchRunner(source, threads=1)
    logits = runner.run(feeds)
    assert torch.get_num_threads() == before
    with torch.inference_mode():
        expected = source.module(*(torch.from_numpy(feeds[n]) for n in source.io.input_names))
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    np.testing.assert_allclose(logits, expected.float().numpy(), rtol=1e-5, atol=1e-6)
    assert logits.dtype == np.float32 and runner.provider == "pytorch-cpu"
    np.testing.assert_array_equal(runner.timed(feeds)(), logits)
