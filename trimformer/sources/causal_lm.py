"""Hugging Face causal language models: the Llama layout (llama, mistral, qwen2, qwen3) and GPT-2.

A folder is read as a decoder when its ``model_type`` is a decoder family of the registry
(:mod:`trimformer.sources.families`). Weights come from safetensors, or from a pickle checkpoint
opened with ``weights_only=True`` only. The model runs with eager attention in float32, the form
the exporter traces and the parity checks compare against. The tokenizer must know the model's
bos and eos tokens: a generator that stops on an id the tokenizer never produces, or starts every
prompt with one it cannot write, answers wrongly without an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from trimformer.data.tokenizer import load_tokenizer
from trimformer.errors import UserError
from trimformer.formats.decoder import DecoderSpec
from trimformer.formats.tasks import CAUSAL_LM, task_spec
from trimformer.fsutil import hash_files
from trimformer.sources.base import LoadedSource, SourceIO
from trimformer.sources.families import FamilySpec, family_of
from trimformer.sources.hf import WEIGHT_FILES, load_state_dict_safely, read_config

__all__ = ["GENERATION_CONFIG", "CausalLMLogits", "TorchDecoder", "decoder_spec", "load_causal_lm"]

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


class CausalLMLogits(nn.Module):
    """The causal-LM task's graph inputs to next-token ``logits``, with no cache (a full pass)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        logits: torch.Tensor = out.logits
        return logits


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def decoder_spec(config: Any, family: FamilySpec) -> DecoderSpec:
    """The graph-level facts of a loaded causal-LM config (``transformers`` config object)."""
    dims = family.dims
    heads = int(getattr(config, dims.heads))
    hidden = int(getattr(config, dims.hidden))
    kv_heads = int(getattr(config, dims.kv_heads) or heads) if dims.kv_heads else heads
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    bos = _ids(getattr(config, "bos_token_id", None))
    return DecoderSpec(
        family=family.model_type,
        num_layers=int(getattr(config, dims.layers)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=int(getattr(config, dims.vocab)),
        context_length=int(getattr(config, dims.positions)),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_ids(getattr(config, "eos_token_id", None)),
        pad_token_id=getattr(config, "pad_token_id", None),
    )


def _check_special_tokens(spec: DecoderSpec, tokenizer: Tokenizer, folder: Path) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    named = {"bos": [spec.bos_token_id] if spec.bos_token_id is not None else [], "eos": spec.eos_token_ids}
    for role, ids in named.items():
        for token_id in ids:
            if not 0 <= token_id < size or tokenizer.id_to_token(token_id) is None:
                raise UserError(
                    f"the tokenizer in {folder} has no token for the model's {role} id {token_id} "
                    f"(tokenizer vocabulary {size}); use the tokenizer the model was trained with"
                )
    if size > spec.vocab_size:
        raise UserError(
            f"the tokenizer in {folder} has {size} tokens but the model only {spec.vocab_size} "
            "embeddings; use the tokenizer the model was trained with"
        )


def _pad_id(spec: DecoderSpec) -> int:
    # Padding is masked out everywhere; any id the embedding table has will do.
    if spec.pad_token_id is not None:
        return int(spec.pad_token_id)
    return spec.eos_token_ids[0] if spec.eos_token_ids else 0


def _refuse_partial_load(info: dict[str, Any], folder: Path) -> None:
    """transformers re-initialises weights that are missing or of another shape, with a warning
    only; a model that is partly random must not reach export or validation."""
    problems = [
        f"{len(info.get(key) or [])} {key.replace('_', ' ')}"
        for key in ("missing_keys", "mismatched_keys")
        if info.get(key)
    ]
    if problems:
        first = sorted(info.get("missing_keys") or [str(k[0]) for k in info["mismatched_keys"]])[0]
        raise UserError(
            f"the weights in {folder} do not fit its config.json ({', '.join(problems)}, e.g. {first}); "
            "use the config the model was saved with"
        )


def load_causal_lm(folder: Path) -> LoadedSource:
    """Load a causal-LM folder of a supported family (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = read_config(folder)
    family = family_of(str(config_dict.get("model_type", "")), str(folder), CAUSAL_LM)
    load_state_dict_safely(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(folder),
            config=config,
            attn_implementation="eager",
            local_files_only=True,
            output_loading_info=True,
        )
        model, info = loaded
    except Exception as exc:
        raise UserError(f"cannot load the model in {folder}: {str(exc).splitlines()[0]}") from exc
    _refuse_partial_load(info, folder)
    model = model.float().eval()
    spec = decoder_spec(model.config, family)
    tokenizer = load_tokenizer(folder)
    _check_special_tokens(spec, tokenizer, folder)
    task = task_spec(CAUSAL_LM)
    generation = folder / GENERATION_CONFIG
    if generation.is_file():
        config_dict["trimformer_generation"] = json.loads(generation.read_text(encoding="utf-8"))
    config_dict["trimformer_decoder"] = spec.to_extras()
    weight_files = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    return LoadedSource(
        kind="hf",
        folder=folder,
        architecture=family.model_type,
        task=CAUSAL_LM,
        model=model,
        module=CausalLMLogits(model).eval(),
        io=SourceIO(
            input_names=task.inputs,
            output_names=(task.output,),
            output_axes={task.output: ("batch", "sequence", spec.vocab_size)},
        ),
        tokenizer=tokenizer,
        labels=None,
        max_length=spec.context_length,
        pad_token_id=_pad_id(spec),
        config=config_dict,
        files_hash="sha256:" + hash_files([folder / "config.json", *weight_files], folder),
    )


class TorchDecoder:
    """A loaded causal LM stepped with its own cache, numpy in and out: validation's PyTorch
    reference (the ``DecoderRunner`` protocol of trimformer.validation.decoder)."""

    def __init__(self, source: LoadedSource, threads: int) -> None:
        self.source = source
        self.name = str(source.folder)
        self.spec = DecoderSpec.from_dict(source.config["trimformer_decoder"], self.name)
        self.threads = threads

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.source.model(
                    input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions),
                    past_key_values=past,
                    use_cache=True,
                )
        finally:
            torch.set_num_threads(previous)
        return out.logits.float().numpy(), (out.past_key_values, mask, positions[:, -1:] + 1)

    def prompt(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, Any]:
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        return self._run(ids, mask.astype(np.int64), positions, None)

    def step(self, next_ids: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        past, mask, positions = state
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        return self._run(next_ids.astype(np.int64), mask, positions, past)
