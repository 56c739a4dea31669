"""Layer-wise block reconstruction after pruning, on the PyTorch source.

The ridge refit of the ``prune`` pass (:mod:`trimformer.passes.prune.reconstruct`) can only move the
output-projection and down-projection rows, and a pruned attention branch is not linear in its
Q/K/V weights, so half the FLOPs removed leaves each attention block 30-45% off its unpruned
output. This step goes further, in the post-training spirit of Kwon et al.'s layer-wise mask
tuning and of block reconstruction in post-training quantization (BRECQ, Li et al. 2021): layer
by layer, every kept weight of the layer's linear projections (Q, K, V, output, up, down and
their biases) is tuned by Adam so that the pruned layer, fed the pruned model's own activations,
reproduces the unpruned layer's output on the calibration tokens. No labels and no end-to-end
loss: each layer only learns to imitate its unpruned self, so upstream errors get corrected
layer by layer as the ridge refit does.

The tuned weights are written back into the pruned ONNX graph by structure (the blocks that
``find_blocks`` recognises), after checking that the graph and the pruned PyTorch model agree
before tuning; after writing, the graph must reproduce the tuned PyTorch model's outputs.
LayerNorm parameters stay as they are (the pruned graph keeps them untouched as well).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trimformer.errors import ParityError, UserError
from trimformer.progress import progress_bar
from trimformer.sources import LoadedSource
from trimformer.sources.pruning import LayerModules, apply_pruning_record, layer_modules

__all__ = [
    "PROJECTIONS",
    "BlockConfig",
    "LayerFit",
    "LayerWeights",
    "ProjectionStore",
    "block_reconstruct",
    "torch_linears",
]

logger = logging.getLogger(__name__)

PARITY_ATOL = 1e-3
PROJECTIONS = ("q", "k", "v", "out", "up", "down")
# One layer's projections: name -> (weight [in, out] as an ONNX MatMul holds it, bias or None).
LayerWeights = dict[str, tuple[np.ndarray, np.ndarray | None]]


class ProjectionStore(Protocol):
    """The pruned graph's side (trimformer.passes.prune.projections.GraphProjections): this module
    only sees arrays, so training never imports the ONNX passes."""

    def read(self) -> list[LayerWeights]: ...

    def write(self, layers: list[LayerWeights]) -> None: ...

    def logits(self, feeds: list[dict[str, np.ndarray]]) -> np.ndarray: ...


@dataclass(frozen=True)
class LayerFit:
    """How close one tuned layer came to its unpruned self (relative L2 error on real tokens)."""

    layer: int
    relative_error_before: float
    relative_error_after: float
    tokens: int


@dataclass(frozen=True)
class BlockConfig:
    steps: int = 240  # Adam steps per layer
    lr: float = 1e-3


# -- which weights, on each side ------------------------------------------------------------------
def torch_linears(m: LayerModules) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The layer's projections as ``(weight [out, in], bias)`` views of its parameters."""
    attn: Any = m.attention
    if m.kind == "plain":
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        size = weight.shape[0] // 3
        qkv = {
            key: (weight[i * size : (i + 1) * size], bias[i * size : (i + 1) * size])
            for i, key in enumerate("qkv")
        }
    elif m.kind == "bert":
        qkv = {
            k: (lin.weight, lin.bias)
            for k, lin in zip("qkv", (attn.query, attn.key, attn.value), strict=True)
        }
    else:
        qkv = {
            k: (lin.weight, lin.bias)
            for k, lin in zip("qkv", (attn.q_lin, attn.k_lin, attn.v_lin), strict=True)
        }
    return {
        **qkv,
        "out": (m.out.weight, m.out.bias),
        "up": (m.up.weight, m.up.bias),
        "down": (m.down.weight, m.down.bias),
    }


def _check_graph_matches(graph_side: list[LayerWeights], mods: list[LayerModules]) -> None:
    """The pruned graph's weights are the pruned PyTorch model's, projection by projection."""
    for i, (g, m) in enumerate(zip(graph_side, mods, strict=True)):
        t = torch_linears(m)
        for key in PROJECTIONS:
            if g[key][0].shape != tuple(t[key][0].shape[::-1]):
                raise UserError(
                    f"layer {i} {key}: graph and PyTorch model differ in shape; cannot reconstruct"
                )


def _load_from_graph(graph_side: list[LayerWeights], mods: list[LayerModules]) -> None:
    """Start from the graph's weights (the ridge refit of the prune pass, if it ran)."""
    with torch.no_grad():
        for g, m in zip(graph_side, mods, strict=True):
            t = torch_linears(m)
            for key in PROJECTIONS:
                weight, bias = g[key]
                t[key][0].copy_(torch.from_numpy(np.array(weight.T)))
                param = t[key][1]
                if bias is not None and param is not None:
                    param.copy_(torch.from_numpy(bias.reshape(-1).copy()))


def _tuned_weights(mods: list[LayerModules]) -> list[LayerWeights]:
    """The tuned projections, in the graph's orientation ([in, out])."""
    layers = []
    for m in mods:
        t = torch_linears(m)
        layers.append(
            {
                key: (
                    t[key][0].detach().numpy().T.copy(),
                    None if t[key][1] is None else t[key][1].detach().numpy().copy(),  # type: ignore[union-attr]
                )
                for key in PROJECTIONS
            }
        )
    return layers


# -- running one layer at a time -----------------------------------------------------------------
class _Stop(Exception):
    pass


class _Stepper:
    """Embeddings of a batch, then one encoder layer at a time, as the model's own forward does."""

    def __init__(self, source: LoadedSource, model: nn.Module) -> None:
        from trimformer.sources.plain import PlainTransformerClassifier

        self.model = model
        self.plain = isinstance(model, PlainTransformerClassifier)
        self.mods = layer_modules(model)
        self.input_names = source.io.input_names

    def embed(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        model: Any = self.model
        if self.plain:
            return model.embed_inputs(feeds["input_ids"], feeds["attention_mask"])  # type: ignore[no-any-return]
        store: dict[str, Any] = {}

        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            store["context"] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Stop

        handle = self.mods[0].layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(**{name: feeds[name] for name in self.input_names})
        except _Stop:
            pass
        finally:
            handle.remove()
        return store["hidden"], store["context"]

    def layer(self, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        layer: Any = self.mods[index].layer
        if self.plain:
            model: Any = self.model
            return model.layer_forward(layer, hidden, context)  # type: ignore[no-any-return]
        args, kwargs = context
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def _relative_error(
    run: Callable[[int], torch.Tensor], targets: list[torch.Tensor], masks: list[torch.Tensor]
) -> float:
    err = ref = 0.0
    with torch.no_grad():
        for i, (target, mask) in enumerate(zip(targets, masks, strict=True)):
            err += float(((run(i) - target)[mask] ** 2).sum())
            ref += float((target[mask] ** 2).sum())
    return math.sqrt(err / max(ref, 1e-30))


def _tune_layer(
    stepper: _Stepper,
    index: int,
    inputs: list[tuple[torch.Tensor, Any]],
    targets: list[torch.Tensor],
    masks: list[torch.Tensor],
    config: BlockConfig,
) -> tuple[float, float]:
    params = [p for _, (w, b) in torch_linears(stepper.mods[index]).items() for p in (w, b) if p is not None]
    # The plain model's Q/K/V are views of one parameter: optimise the leaves.
    leaves = list(
        {
            id(p._base if p._base is not None else p): (p._base if p._base is not None else p) for p in params
        }.values()
    )
    before = _relative_error(lambda i: stepper.layer(index, *inputs[i]), targets, masks)
    if not leaves or config.steps < 1:
        return before, before
    saved = [leaf.detach().clone() for leaf in leaves]
    for leaf in leaves:
        leaf.requires_grad_(True)
    optimizer = torch.optim.Adam(leaves, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / config.steps, 1.0)))
    )
    with torch.enable_grad():
        for step in range(config.steps):
            i = step % len(inputs)
            output = stepper.layer(index, *inputs[i])
            loss = F.mse_loss(output[masks[i]], targets[i][masks[i]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
    for leaf in leaves:
        leaf.requires_grad_(False)
    after = _relative_error(lambda i: stepper.layer(index, *inputs[i]), targets, masks)
    if not after < before:  # never leave a layer worse than the ridge refit did
        with torch.no_grad():
            for leaf, old in zip(leaves, saved, strict=True):
                leaf.copy_(old)
        after = before
    return before, after


def _logits(model: nn.Module, feeds: list[dict[str, torch.Tensor]], names: tuple[str, ...]) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(*[f[n] for n in names]).numpy() for f in feeds])


def _numpy(feeds: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    return [{k: v.numpy() for k, v in f.items()} for f in feeds]


def block_reconstruct(
    graph: ProjectionStore,
    source: LoadedSource,
    record: dict[str, Any],
    feeds: list[dict[str, torch.Tensor]],
    config: BlockConfig,
) -> list[LayerFit]:
    """Tune the pruned graph's projections layer by layer against the unpruned PyTorch model.

    ``feeds``: calibration batches (graph input name -> int64 tensor). The tuned weights are
    written into ``graph``, which must then reproduce the tuned PyTorch model; one fit per layer.
    """
    if not feeds:
        raise UserError("block reconstruction needs calibration data")
    # One deep copy of the graph-signature wrapper, so the model inside is copied with it.
    student_module = copy.deepcopy(source.module).eval()
    student_model: nn.Module = (
        student_module if source.module is source.model else student_module.get_submodule("model")
    )
    apply_pruning_record(student_model, record)
    student = _Stepper(source, student_model)
    graph_side = graph.read()
    _check_graph_matches(graph_side, student.mods)
    _load_from_graph(graph_side, student.mods)
    probe = feeds[:2]
    names = source.io.input_names
    start_diff = float(np.abs(graph.logits(_numpy(probe)) - _logits(student_module, probe, names)).max())
    if start_diff > PARITY_ATOL:
        raise UserError(
            f"the pruned graph and the pruned PyTorch model differ by {start_diff:.2e} before tuning; "
            "is --source the model this graph was exported from?"
        )
    reference = _Stepper(source, source.model)
    masks = [
        (f["attention_mask"] if "attention_mask" in f else torch.ones_like(f[names[0]])).bool() for f in feeds
    ]
    for p in student_model.parameters():  # the copy only; the source's targets run under no_grad
        p.requires_grad_(False)
    steps: list[LayerFit] = []
    tokens = int(sum(int(m.sum()) for m in masks))
    with torch.no_grad():
        ref_states = [reference.embed(f) for f in feeds]
        states = [student.embed(f) for f in feeds]
    with progress_bar("block reconstruction", len(student.mods)) as bar:
        for index in range(len(student.mods)):
            with torch.no_grad():
                targets = [reference.layer(index, h, c) for h, c in ref_states]
            before, after = _tune_layer(student, index, states, targets, masks, config)
            steps.append(LayerFit(index, before, after, tokens))
            logger.debug("layer %d: relative error %.4f -> %.4f", index, before, after)
            with torch.no_grad():
                states = [(student.layer(index, h, c), c) for h, c in states]
            ref_states = [(t, c) for t, (_, c) in zip(targets, ref_states, strict=True)]
            bar.advance(bar.task_ids[0])
    graph.write(_tuned_weights(student.mods))
    end_diff = float(np.abs(graph.logits(_numpy(probe)) - _logits(student_module, probe, names)).max())
    if end_diff > PARITY_ATOL:
        raise ParityError(
            f"the reconstructed graph differs from the tuned PyTorch model by {end_diff:.2e}; please report this model"
        )
    return steps
