"""Pruning records on the PyTorch side: load, replay (physically remove heads and neurons), mask.

The record (``pruning_record.json``, written by the prune stage next to the pruned graph) says per
layer which heads and feed-forward neurons of the ORIGINAL model were kept. ``apply_pruning_record``
removes the others from a Hugging Face BERT/DistilBERT/RoBERTa model or trimformer's plain model so
that its logits equal the pruned ONNX graph's (with reconstruction off); the distillation stage uses
it to build a pruned student. ``mask_model`` zeroes the same heads/neurons without removing them:
the reference that pruning must reproduce exactly.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trimformer.errors import UserError
from trimformer.formats.pruning_record import RECORD_FILE, load_pruning_record, validate_record

if TYPE_CHECKING:
    from trimformer.sources.base import LoadedSource

__all__ = [
    "LayerModules",
    "apply_pruning_record",
    "layer_modules",
    "mask_model",
]


@dataclass
class LayerModules:
    """The Linear layers of one encoder layer that head and neuron pruning touch."""

    kind: str  # "bert" (BERT/RoBERTa), "distilbert" or "plain"
    layer: Any  # nn.Module; Any because the per-family submodules are reached by attribute
    attention: Any  # the module holding head counts
    out: nn.Linear  # output projection (input features = heads x head_dim)
    up: nn.Linear
    down: nn.Linear
    num_heads: int
    head_dim: int


def _core(model: nn.Module) -> nn.Module:
    """The encoder-bearing module of a Hugging Face model (with or without a task head)."""
    for name in ("bert", "roberta", "distilbert"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def layer_modules(model: nn.Module) -> list[LayerModules]:
    """The prunable modules of each layer, for HF BERT/DistilBERT/RoBERTa and the plain model."""
    from trimformer.sources.plain import PlainTransformerClassifier

    if isinstance(model, PlainTransformerClassifier):
        head_dim = model.config.hidden_size // model.config.num_heads
        found = []
        for layer in model.encoder.layers:
            attn = layer.self_attn
            heads = int(getattr(attn, "trimformer_heads", model.config.num_heads))
            found.append(
                LayerModules(
                    "plain", layer, attn, attn.out_proj, layer.linear1, layer.linear2, heads, head_dim
                )
            )
        return found
    core = _core(model)
    encoder = getattr(core, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer"):
        found = []
        for layer in encoder.layer:
            self_attn = layer.attention.self
            head_dim = int(
                getattr(self_attn, "attention_head_size", 0) or getattr(layer.attention, "head_dim", 0)
            )
            heads = int(getattr(self_attn, "num_attention_heads", 0))
            found.append(
                LayerModules(
                    "bert",
                    layer,
                    self_attn,
                    layer.attention.output.dense,
                    layer.intermediate.dense,
                    layer.output.dense,
                    heads,
                    head_dim,
                )
            )
        return found
    transformer = getattr(core, "transformer", None)
    if transformer is not None and hasattr(transformer, "layer"):
        found = []
        for layer in transformer.layer:
            attn = layer.attention
            heads = int(getattr(attn, "n_heads", 0))
            head_dim = int(getattr(attn, "attention_head_size", 0))
            found.append(
                LayerModules(
                    "distilbert", layer, attn, attn.out_lin, layer.ffn.lin1, layer.ffn.lin2, heads, head_dim
                )
            )
        return found
    raise UserError(
        f"cannot find encoder layers in a {type(model).__name__}; supported: BERT, DistilBERT, RoBERTa, plain"
    )


def _check_matches(mods: list[LayerModules], record: dict[str, Any]) -> None:
    if len(mods) != record["num_layers"]:
        raise UserError(f"the record has {record['num_layers']} layers, the model {len(mods)}")
    for i, (m, entry) in enumerate(zip(mods, record["layers"], strict=True)):
        heads = int(entry.get("num_heads", record["num_heads"]))
        ffn = int(entry.get("ffn_size", record["ffn_size"]))
        if m.num_heads != heads or m.head_dim != record["head_dim"]:
            raise UserError(
                f"layer {i}: the model has {m.num_heads} heads of {m.head_dim}, the record {heads} of "
                f"{record['head_dim']} (already pruned, or another model?)"
            )
        if m.up.out_features != ffn or m.out.out_features != record["hidden_size"]:
            raise UserError(
                f"layer {i}: the model's sizes ({m.up.out_features} neurons, hidden "
                f"{m.out.out_features}) do not match the record ({ffn}, {record['hidden_size']})"
            )


# -- replay --------------------------------------------------------------------------------------
def _take_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with the chosen output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    if dim == 0 and bias is not None:
        bias = bias.index_select(0, index).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-width layers (every head removed) warn on init
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
    return new.to(linear.weight.device)


class _NoHeads(nn.Module):
    """A BERT self-attention with every head removed: a zero-width context."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class _NoHeadsDistil(nn.Module):
    """A DistilBERT attention with every head removed: its output is the output bias."""

    def __init__(self, out: nn.Linear) -> None:
        super().__init__()
        self.out_lin = out

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.out_lin(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


def _prune_layer(m: LayerModules, kept_heads: list[int], kept_neurons: list[int]) -> None:
    d = m.head_dim
    cols = torch.tensor([h * d + j for h in kept_heads for j in range(d)], dtype=torch.long)
    neurons = torch.tensor(kept_neurons, dtype=torch.long)
    # Feed-forward: up-projection rows (out features) and down-projection columns (in features).
    if len(kept_neurons) != m.up.out_features:
        new_up, new_down = _take_linear(m.up, neurons, 0), _take_linear(m.down, neurons, 1)
        if m.kind == "bert":
            m.layer.intermediate.dense, m.layer.output.dense = new_up, new_down
        elif m.kind == "distilbert":
            m.layer.ffn.lin1, m.layer.ffn.lin2 = new_up, new_down
        else:
            m.layer.linear1, m.layer.linear2 = new_up, new_down
    if len(kept_heads) == m.num_heads:
        return
    new_out = _take_linear(m.out, cols, 1)
    if m.kind == "bert":
        attn = m.layer.attention
        attn.output.dense = new_out
        if not kept_heads:
            attn.self = _NoHeads()
            return
        for name in ("query", "key", "value"):
            setattr(attn.self, name, _take_linear(getattr(attn.self, name), cols, 0))
        attn.self.num_attention_heads = len(kept_heads)
        attn.self.all_head_size = len(kept_heads) * d
    elif m.kind == "distilbert":
        if not kept_heads:
            m.layer.attention = _NoHeadsDistil(new_out)
            return
        attn = m.attention
        attn.out_lin = new_out
        for name in ("q_lin", "k_lin", "v_lin"):
            setattr(attn, name, _take_linear(getattr(attn, name), cols, 0))
        attn.n_heads = len(kept_heads)
    else:
        attn = m.attention
        size = attn.out_proj.in_features
        rows = torch.cat([cols + i * size for i in range(3)])
        attn.in_proj_weight = nn.Parameter(attn.in_proj_weight.detach().index_select(0, rows).clone())
        if attn.in_proj_bias is not None:
            attn.in_proj_bias = nn.Parameter(attn.in_proj_bias.detach().index_select(0, rows).clone())
        attn.out_proj.weight = nn.Parameter(new_out.weight.detach())
        attn.out_proj.in_features = new_out.in_features
        attn.trimformer_heads = len(kept_heads)


def apply_pruning_record(model: nn.Module, record: dict[str, Any]) -> None:
    """Physically remove the record's heads and neurons from ``model``, in place.

    A layer with every head removed keeps only its residual path (plus the output bias), as in the
    pruned graph. The plain model needs nothing more: its attention
    (:func:`trimformer.sources.attention.packed_qkv_attention`) reads each layer's head count from
    its weights.
    """
    record = validate_record(record)
    mods = layer_modules(model)
    _check_matches(mods, record)
    for m, entry in zip(mods, record["layers"], strict=True):
        _prune_layer(
            m, sorted(int(h) for h in entry["kept_heads"]), sorted(int(n) for n in entry["kept_neurons"])
        )


# -- masking (the exactness reference, and Fisher scores) ----------------------------------------
def _feature_mask(m: LayerModules, removed: list[int], width: int, group: int) -> torch.Tensor:
    mask = torch.ones(width)
    for unit in removed:
        mask[unit * group : (unit + 1) * group] = 0.0
    return mask


@contextmanager
def mask_model(model: nn.Module, record: dict[str, Any]) -> Iterator[nn.Module]:
    """Within the block, the record's removed heads and neurons contribute zero (nothing removed)."""
    record = validate_record(record)
    mods = layer_modules(model)
    _check_matches(mods, record)
    handles = []
    for m, entry in zip(mods, record["layers"], strict=True):
        for linear, removed, group in (
            (m.out, list(entry["removed_heads"]), m.head_dim),
            (m.down, list(entry["removed_neurons"]), 1),
        ):
            if not removed:
                continue
            mask = _feature_mask(m, removed, linear.in_features, group)

            def hook(
                _mod: nn.Module, args: tuple[torch.Tensor, ...], mask: torch.Tensor = mask
            ) -> tuple[torch.Tensor]:
                return (args[0] * mask.to(args[0].dtype),)

            handles.append(linear.register_forward_pre_hook(hook))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def load_pruned_source(folder: str | Path) -> LoadedSource:
    """Load a model folder that carries ``pruning_record.json`` (a pruned, retrained student).

    A pruned student's per-layer head and neuron counts are not expressible in ``config.json``; its
    folder holds ``pruning_record.json``, and the model is rebuilt from the config, pruned by the
    record, then given the saved weights.
    """
    folder = Path(folder)
    record_path = folder / RECORD_FILE
    record = load_pruning_record(record_path)
    from safetensors.torch import load_file

    from trimformer.data.tokenizer import load_tokenizer
    from trimformer.fsutil import hash_files
    from trimformer.sources.base import LoadedSource, SourceIO
    from trimformer.sources.families import FAMILIES
    from trimformer.sources.hf import SUPPORTED_ARCHITECTURES, ClassifierHead, EmbeddingHead, read_pooling
    from trimformer.sources.plain import (
        PLAIN_CONFIG_FILE,
        PlainTransformerClassifier,
        is_plain_folder,
        read_plain_config,
    )

    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    if is_plain_folder(folder):
        plain = PlainTransformerClassifier(read_plain_config(folder))
        apply_pruning_record(plain, record)
        plain.load_state_dict(state, strict=True)
        return LoadedSource(
            kind="plain", folder=folder, architecture="plain-transformer", task="sequence-classification",
            model=plain.eval(), module=plain,
            io=SourceIO(("input_ids", "attention_mask"), ("logits",), {"logits": ("batch", len(plain.config.labels))}),
            tokenizer=load_tokenizer(folder), labels=list(plain.config.labels),
            max_length=plain.config.max_length, pad_token_id=plain.config.pad_token_id,
            config={**plain.config.__dict__, "model_type": "plain-transformer"},
            files_hash="sha256:" + hash_files([weights, folder / PLAIN_CONFIG_FILE, record_path], folder),
        )  # fmt: skip
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    config: Any = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    classify = any(str(a).endswith("ForSequenceClassification") for a in config.architectures or [])
    factory: Any = AutoModelForSequenceClassification if classify else AutoModel
    model = factory.from_config(config, attn_implementation="eager")
    apply_pruning_record(model, record)
    model.load_state_dict(state, strict=True)
    model.eval()
    input_names = SUPPORTED_ARCHITECTURES[str(config.model_type)]
    config_dict = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    module: nn.Module
    if classify:
        labels: list[str] | None = [str(config.id2label[i]) for i in range(config.num_labels)]
        module, task = ClassifierHead(model, input_names), "sequence-classification"
        outputs, axes = ("logits",), {"logits": ("batch", config.num_labels)}
    else:
        mode, normalize = read_pooling(folder)
        labels, task = None, "feature-extraction"
        module = EmbeddingHead(model, input_names, mode, normalize)
        outputs, axes = ("sentence_embedding",), {"sentence_embedding": ("batch", int(config.hidden_size))}
        config_dict["trimformer_pooling"] = {"mode": mode, "normalize": normalize}
    family = FAMILIES[str(config.model_type)]
    max_positions = int(getattr(config, family.dims.positions, 512)) - family.reserved_positions
    return LoadedSource(
        kind="hf", folder=folder, architecture=str(config.model_type), task=task, model=model,
        module=module.eval(), io=SourceIO(input_names, outputs, axes),  # type: ignore[arg-type]
        tokenizer=load_tokenizer(folder), labels=labels, max_length=min(max_positions, 512),
        pad_token_id=int(getattr(config, "pad_token_id", 0) or 0), config=config_dict,
        files_hash="sha256:" + hash_files([folder / "config.json", weights, record_path], folder),
    )  # fmt: skip
