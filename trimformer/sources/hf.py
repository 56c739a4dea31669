"""Hugging Face folders of the BERT family: sequence classification and sentence embeddings."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trimformer.data.tokenizer import load_tokenizer
from trimformer.errors import UserError
from trimformer.formats.tasks import CAUSAL_LM, ENCODER_TASKS, FEATURE_EXTRACTION, SEQUENCE_CLASSIFICATION
from trimformer.fsutil import hash_files
from trimformer.sources.base import LoadedSource, SourceIO
from trimformer.sources.families import DECODER_FAMILIES, ENCODER_FAMILIES, FAMILIES, family_of

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "WEIGHT_FILES",
    "infer_task",
    "is_hf_folder",
    "load_hf",
    "load_state_dict_safely",
    "read_config",
    "read_pooling",
]

logger = logging.getLogger(__name__)

# Encoder model_type -> graph inputs, from the family registry. MiniLM checkpoints are "bert".
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    name: FAMILIES[name].inputs for name in ENCODER_FAMILIES
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES)


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'} must hold a JSON object")
    return config


def infer_task(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        return SEQUENCE_CLASSIFICATION
    archs_text = " ".join(str(a) for a in archs)
    if "ForCausalLM" in archs_text or "LMHeadModel" in archs_text:
        return CAUSAL_LM
    if str(config.get("model_type", "")) in DECODER_FAMILIES:
        return CAUSAL_LM
    return FEATURE_EXTRACTION


def read_pooling(folder: Path) -> tuple[str, bool]:
    """Pooling mode and normalisation declared by a sentence-transformers folder (mean by default)."""
    mode, normalize = "mean", False
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        cfg = json.loads(pooling_file.read_text(encoding="utf-8"))
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif cfg.get("pooling_mode_max_tokens"):
            mode = "max"
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        normalize = any("Normalize" in str(m.get("type", "")) for m in modules if isinstance(m, dict))
    return mode, normalize


def load_state_dict_safely(folder: Path) -> dict[str, torch.Tensor] | None:
    """Only a pickle checkpoint needs care: open it with ``weights_only=True``."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return None
    path = folder / "pytorch_model.bin"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(
            f"refusing {path}: it is not a plain tensor checkpoint (weights_only loading failed); "
            "convert it to model.safetensors with a trusted tool"
        ) from exc
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict; convert it to model.safetensors")
    return state


class ClassifierHead(nn.Module):
    """Graph signature for sequence classification: token tensors in, ``logits`` out."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        return self.model(**kwargs).logits


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        masked = hidden.masked_fill(mask.unsqueeze(-1) == 0, -1e9)
        pooled = masked.max(dim=1).values
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
    return pooled


class EmbeddingHead(nn.Module):
    """Graph signature for feature extraction: ``sentence_embedding`` with the folder's pooling."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], mode: str, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.mode = mode
        self.normalize = normalize

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        hidden = self.model(**kwargs).last_hidden_state
        return pool(hidden, kwargs["attention_mask"], self.mode, self.normalize)


def load_hf(folder: Path, task: str | None = None, num_labels: int | None = None) -> LoadedSource:
    """Load a Hugging Face folder; ``num_labels`` re-heads a model for fine-tuning."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config_dict = read_config(folder)
    model_type = str(config_dict.get("model_type", ""))
    task = task or infer_task(config_dict)
    family = family_of(model_type, str(folder), task)
    if task not in ENCODER_TASKS:
        raise UserError(f"unknown task {task!r} for an encoder; choose one of: {', '.join(ENCODER_TASKS)}")
    input_names = family.inputs
    # A pickle checkpoint is opened with weights_only=True first: a file that needs more than plain
    # tensors is refused before transformers (or anything else) unpickles it.
    load_state_dict_safely(folder)
    # Eager attention exports to the plain MatMul/Softmax pattern that fusion and pruning recognise.
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if task == "sequence-classification":
            if num_labels is not None and num_labels != config.num_labels:
                config.num_labels = num_labels
                config.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
                config.label2id = {v: k for k, v in config.id2label.items()}
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), config=config, ignore_mismatched_sizes=num_labels is not None, **kwargs
            )
        else:
            model = AutoModel.from_pretrained(str(folder), config=config, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot load the model in {folder}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    tokenizer = load_tokenizer(folder)
    labels: list[str] | None = None
    module: nn.Module
    if task == "sequence-classification":
        id2label = model.config.id2label
        labels = [str(id2label[i]) for i in range(model.config.num_labels)]
        module = ClassifierHead(model, input_names)
        outputs: tuple[str, ...] = ("logits",)
        axes: dict[str, tuple[str | int, ...]] = {"logits": ("batch", len(labels))}
    else:
        mode, normalize = read_pooling(folder)
        module = EmbeddingHead(model, input_names, mode, normalize)
        outputs = ("sentence_embedding",)
        axes = {"sentence_embedding": ("batch", int(model.config.hidden_size))}
        config_dict["trimformer_pooling"] = {"mode": mode, "normalize": normalize}
    max_positions = int(getattr(model.config, family.dims.positions, 512)) - family.reserved_positions
    weight_files = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    return LoadedSource(
        kind="hf",
        folder=folder,
        architecture=model_type,
        task=task,
        model=model,
        module=module.eval(),
        io=SourceIO(input_names=input_names, output_names=outputs, output_axes=axes),
        tokenizer=tokenizer,
        labels=labels,
        max_length=min(max_positions, 512),
        pad_token_id=int(getattr(model.config, "pad_token_id", 0) or 0),
        config=config_dict,
        files_hash="sha256:" + hash_files([folder / "config.json", *weight_files], folder),
    )
