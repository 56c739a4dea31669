"""Fisher importance of heads and feed-forward neurons, on the PyTorch source.

As Michel et al. 2019 and Kwon et al. 2022: put a mask ``m`` (all ones) on each head's context and
each neuron's activation, and score a unit by the empirical Fisher information of its mask,
``sum over examples of (dL/dm)^2``. The per-example gradient is computed for a whole batch at
once: for the input ``x`` of an output/down projection and its gradient ``g``,
``dL_b/dm_j = sum_t x[b, t, j] * g[b, t, j]`` (summed over each head's features).

The loss is the cross-entropy with the calibration labels when there are any, else with the
model's own predictions. The scores are handed to the ``prune`` pass as data (passes never
import torch).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from trimformer.data import Encoder, TextDataset, map_labels
from trimformer.errors import UserError
from trimformer.progress import progress_bar
from trimformer.sources import LoadedSource
from trimformer.sources.pruning import LayerModules, layer_modules

__all__ = ["fisher_scores"]

logger = logging.getLogger(__name__)


def fisher_scores(
    source: LoadedSource,
    dataset: TextDataset,
    samples: int = 256,
    batch_size: int = 16,
    max_length: int = 128,
) -> dict[str, Any]:
    """``{"heads": [[...] per layer], "neurons": [[...] per layer]}`` on up to ``samples`` texts."""
    if source.task != "sequence-classification":
        raise UserError(
            "fisher importance needs a classifier (a loss); use --importance activation for embeddings"
        )
    model = source.module
    model.eval()
    mods = layer_modules(source.model)
    heads = [torch.zeros(m.num_heads, dtype=torch.float64) for m in mods]
    neurons = [torch.zeros(m.up.out_features, dtype=torch.float64) for m in mods]
    labels: Any = None
    if dataset.labels is not None and source.labels is not None:
        try:
            labels = map_labels(dataset.labels, source.labels)
        except UserError:
            labels = None
    encoder = Encoder(
        source.tokenizer, source.io.input_names, min(max_length, source.max_length), source.pad_token_id
    )
    captured: dict[int, torch.Tensor] = {}

    def make_hook(key: int) -> Any:
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if x.requires_grad:
                x.retain_grad()
            captured[key] = x

        return hook

    linears = [lin for m in mods for lin in (m.out, m.down)]
    handles = [lin.register_forward_pre_hook(make_hook(i)) for i, lin in enumerate(linears)]
    count = min(samples, len(dataset))
    previous = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with progress_bar("fisher importance", (count + batch_size - 1) // batch_size) as bar:
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                pairs = None if dataset.pairs is None else dataset.pairs[start:stop]
                feeds = encoder(dataset.texts[start:stop], pairs)
                tensors = [torch.from_numpy(feeds[n]) for n in source.io.input_names]
                captured.clear()
                target = None if labels is None else torch.tensor(labels[start:stop])
                xs, grads = _input_gradients(source, tensors, target, captured, len(linears))
                _accumulate(mods, xs, grads, heads, neurons)
                bar.advance(bar.task_ids[0])
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), previous, strict=True):
            p.requires_grad_(flag)
    return {"heads": [h.numpy().tolist() for h in heads], "neurons": [n.numpy().tolist() for n in neurons]}


def _input_gradients(
    source: LoadedSource,
    tensors: list[torch.Tensor],
    target: torch.Tensor | None,
    captured: dict[int, torch.Tensor],
    count: int,
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """One batch's captured projection inputs and the loss's gradients with respect to them; the
    target is the labels, or the model's own predictions without them."""
    with torch.enable_grad():
        # Gradients flow from the embeddings on; weights stay frozen.
        embedding = _embedding_output_hook(source.model)
        try:
            logits = source.module(*tensors)
        finally:
            embedding.remove()
        if target is None:
            target = logits.detach().argmax(dim=-1)
        loss = F.cross_entropy(logits, target, reduction="sum")
        xs = [captured[i] for i in range(count)]
        return xs, torch.autograd.grad(loss, xs)


def _accumulate(
    mods: list[LayerModules],
    xs: list[torch.Tensor],
    grads: tuple[torch.Tensor, ...],
    heads: list[torch.Tensor],
    neurons: list[torch.Tensor],
) -> None:
    """Add the batch's squared per-example (input x gradient) sums of each head and neuron."""
    for i, m in enumerate(mods):
        for which, store, group in ((2 * i, heads[i], m.head_dim), (2 * i + 1, neurons[i], 1)):
            per_example = (xs[which].detach() * grads[which]).sum(dim=1).double()  # [batch, features]
            per_unit = per_example.reshape(per_example.shape[0], -1, group).sum(dim=-1)
            store += (per_unit**2).sum(dim=0)


def _embedding_output_hook(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the embedding output require grad, so gradients reach every layer's projections."""
    target: nn.Module | None = None
    for name, module in model.named_modules():
        if name.endswith("embeddings") or name in ("embed_norm",):
            target = module
            break
    if target is None:
        target = next(m for m in model.modules() if isinstance(m, nn.Embedding))

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return output.detach().requires_grad_(True)
        return output

    return target.register_forward_hook(hook)
