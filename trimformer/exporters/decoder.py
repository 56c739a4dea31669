"""Causal LM -> one ONNX graph with a KV cache, proved by prompt logits and greedy tokens.

One graph serves the prompt (an empty past) and every decode step (a past of any length), with
dynamic batch, sequence and past axes (contract: :mod:`trimformer.formats.decoder`). The export
fails, and writes nothing, unless

1. on each parity prompt, the prompt's logits from onnxruntime are within ``atol`` of the Hugging
   Face model's, and
2. greedy decoding of ``new_tokens`` tokens through the exported graph, stepping its own cache,
   gives exactly the tokens the Hugging Face model gives with its own cache.

A mismatch names the prompt and the first differing position. Prompts are the test split of a
dataset (``prompts="builtin:tweets"``: each text's first half, at least 20 of them) or
:data:`PARITY_PROMPTS`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from trimformer import __version__
from trimformer.artifact import (
    MODEL_FILE,
    ArtifactMeta,
    IOSpec,
    LineageStep,
    ModelArtifact,
    TokenizerSpec,
    write_meta,
)
from trimformer.data.prompts import PARITY_PROMPTS, held_out_prompts
from trimformer.errors import ParityError, UserError
from trimformer.exporters.decoder_module import CachedDecoder
from trimformer.exporters.streamed import write_with_weights
from trimformer.formats.decoder import DECODER_EXTRAS_KEY, DecoderSpec
from trimformer.fsutil import atomic_output_dir
from trimformer.runtime.decoding import CachedSession, greedy_tokens
from trimformer.runtime.session import cpu_session
from trimformer.sources import LoadedSource

__all__ = ["PARITY_PROMPTS", "DecoderParity", "export_decoder", "parity_prompts", "torch_greedy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderParity:
    prompts: int
    new_tokens: int
    logits_max_abs_diff: float
    tokens_compared: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "new_tokens": self.new_tokens,
            "logits_max_abs_diff": self.logits_max_abs_diff,
            "tokens_compared": self.tokens_compared,
            "greedy_tokens_equal": True,
        }


def parity_prompts(source: LoadedSource, data: str | None, count: int, reserve: int) -> list[list[int]]:
    """Token ids of ``count`` prompts, each leaving ``reserve`` positions of the context free."""
    return held_out_prompts(source.tokenizer, source.max_length, data, count, reserve)


def torch_greedy(model: Any, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """PyTorch's greedy tokens with its own KV cache, and the prompt's logits."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        prompt_logits = out.logits[0].float().numpy()
        tokens: list[int] = []
        while True:
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if len(tokens) == new_tokens:
                return tokens, prompt_logits
            out = model(
                input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )


def _dynamic_axes(spec: DecoderSpec) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in spec.past_names()})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in spec.present_names()})
    return axes


def _trace(module: CachedDecoder, spec: DecoderSpec, opset: int, path: Path) -> dict[str, Any]:
    """Trace the graph alone (the weights as inputs), then write it with the module's tensors one
    at a time (:mod:`trimformer.exporters.streamed`): the export holds no copy of the weights."""
    # Traced on a non-empty past with padding, so no axis is specialised to 0 or 1.
    batch, new, past = 2, 3, 4
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec.vocab_size, (batch, new), generator=generator)
    mask = torch.ones((batch, past + new), dtype=torch.int64)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    pasts = [
        torch.randn(batch, spec.num_kv_heads, past, spec.head_dim, generator=generator)
        for _ in spec.past_names()
    ]
    graph_only = path.with_name(f".{path.name}.graph")
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (ids, mask, positions, *pasts),
                str(graph_only),
                input_names=spec.input_names(),
                output_names=spec.output_names(),
                dynamic_axes=_dynamic_axes(spec),
                opset_version=opset,
                export_params=False,
                do_constant_folding=False,
                dynamo=False,
            )
        weights = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        # External data: onnxruntime maps it rather than copying it out of a parsed protobuf, and
        # reading the graph (hashes, io, packaging) never loads the weights.
        return write_with_weights(graph_only, weights, path, external=True)
    finally:
        graph_only.unlink(missing_ok=True)


def check_decoder_parity(
    source: LoadedSource, session: CachedSession, prompts: list[list[int]], new_tokens: int, atol: float
) -> DecoderParity:
    """Prompt logits within ``atol`` and identical greedy tokens on every prompt (see module docstring)."""
    worst = 0.0
    for index, prompt in enumerate(prompts):
        expected, torch_logits = torch_greedy(source.model, prompt, new_tokens)
        got, onnx_logits = greedy_tokens(session, prompt, new_tokens)
        diff = float(np.max(np.abs(onnx_logits - torch_logits)))
        worst = max(worst, diff)
        text = source.tokenizer.decode(prompt)
        if not diff <= atol:
            raise ParityError(
                f"export parity failed on prompt {index} ({text!r}): prompt logits differ from PyTorch by "
                f"{diff:.3g} (tolerance {atol:.1g}); try another --opset or raise --atol"
            )
        if got != expected:
            first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
            raise ParityError(
                f"export parity failed on prompt {index} ({text!r}): greedy token {first} is {got[first]} "
                f"from ONNX but {expected[first]} from PyTorch"
            )
    return DecoderParity(len(prompts), new_tokens, worst, len(prompts) * new_tokens)


def _io_specs(session: Any) -> tuple[list[IOSpec], list[IOSpec]]:
    """Graph inputs and outputs as onnxruntime reads them (no second copy of the weights in Python)."""

    def spec(arg: Any) -> IOSpec:
        dtype = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}[arg.type]
        return IOSpec(
            name=arg.name, dtype=dtype, shape=[d if isinstance(d, int) else str(d) for d in arg.shape]
        )

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def _check_graph(path: Path) -> None:
    """The ONNX checker on the file itself: loading the graph into Python would hold a second copy
    of every weight next to the PyTorch model's (the export's peak memory)."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        raise UserError(f"the exported graph fails the ONNX checker: {str(exc).splitlines()[0]}") from exc


def export_decoder(
    source: LoadedSource,
    out: Path,
    opset: int,
    atol: float,
    overwrite: bool = False,
    prompts: str | None = None,
    new_tokens: int = 32,
    params: dict[str, Any] | None = None,
) -> tuple[ModelArtifact, DecoderParity, float]:
    """Export ``source`` (a loaded causal LM) to an artifact folder; see the module docstring."""
    from trimformer.exporters.torch_export import write_side_files

    if new_tokens < 1:
        raise UserError(f"parity new tokens must be at least 1, got {new_tokens}")
    started = time.perf_counter()
    source.eval()
    spec = DecoderSpec.from_dict(source.config["trimformer_decoder"], str(source.folder))
    token_ids = parity_prompts(source, prompts, len(PARITY_PROMPTS), new_tokens)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        traced = tmp / MODEL_FILE
        try:
            written = _trace(CachedDecoder(source.model, spec).eval(), spec, opset, traced)
        except Exception as exc:
            raise UserError(f"torch.onnx.export failed at opset {opset}: {str(exc).splitlines()[0]}") from exc
        _check_graph(traced)
        session = cpu_session(traced)
        inputs, outputs = _io_specs(session)
        parity = check_decoder_parity(source, CachedSession(session, spec), token_ids, new_tokens, atol)
        del session
        write_side_files(source, tmp)
        meta = ArtifactMeta(
            task=source.task,
            architecture=source.architecture,
            inputs=inputs,
            outputs=outputs,
            tokenizer=TokenizerSpec(
                max_length=source.max_length, pad_token_id=source.pad_token_id, uses_token_type_ids=False
            ),
            opset=opset,
            source_hash=source.files_hash,
            extras={
                DECODER_EXTRAS_KEY: spec.to_extras(),
                "generation": source.config.get("trimformer_generation", {}),
            },
        )
        meta.lineage.append(
            LineageStep(
                step="export",
                params={
                    "opset": opset,
                    "atol": atol,
                    "exporter": "torchscript",
                    "kv_cache": True,
                    **(params or {}),
                },
                input_hash=source.files_hash,
                output_hash=ModelArtifact(tmp, meta).model_hash(),
                trimformer=__version__,
                seconds=round(time.perf_counter() - started, 3),
                stats={"parity": parity.to_dict(), "weights": written},
            )
        )
        write_meta(tmp, meta)
    logger.info("exported %s with a KV cache to %s (%s)", source.architecture, out, parity.to_dict())
    return ModelArtifact.open(out), parity, time.perf_counter() - started
