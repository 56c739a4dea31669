"""Running teacher and student for distillation: outputs plus the intermediate states the losses need.

:func:`model_features` runs a Hugging Face or plain model on a batch and returns its output
(logits or sentence embedding) with, on request, the hidden states (index 0 the embeddings, index
``l + 1`` layer ``l``'s output) and the attention distributions of every layer.

:class:`DistillStudent` wraps the student with the learned projections that map its hidden states
to the teacher's width (TinyBERT's W_h); it is the module the optimizer and DistributedDataParallel
see, so the projections train and synchronise with the student but are never exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trimformer.sources import LoadedSource, PlainTransformerClassifier
from trimformer.sources.hf import pool

__all__ = ["DistillStudent", "Features", "RunSpec", "model_features", "run_spec_for"]


@dataclass(frozen=True)
class RunSpec:
    """How to call a model: its family, task, graph inputs and (for embeddings) pooling."""

    kind: str  # "hf" or "plain"
    task: str
    input_names: tuple[str, ...]
    pooling: str = "mean"
    normalize: bool = False


def run_spec_for(source: LoadedSource) -> RunSpec:
    pooling = source.config.get("trimformer_pooling") or {}
    return RunSpec(
        kind=source.kind,
        task=source.task,
        input_names=tuple(source.io.input_names),
        pooling=str(pooling.get("mode", "mean")),
        normalize=bool(pooling.get("normalize", False)),
    )


@dataclass
class Features:
    output: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)
    # None for a layer whose heads were all pruned.
    attentions: list[torch.Tensor | None] = field(default_factory=list)


def _plain_features(
    model: PlainTransformerClassifier, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Features:
    """The plain model's forward with every layer's output and attention kept."""
    hidden, additive = model.embed_inputs(input_ids, attention_mask)
    states: list[torch.Tensor] = [hidden]
    attentions: list[torch.Tensor | None] = []
    for layer in model.encoder.layers:
        hidden, probs = model.layer_with_attention(layer, hidden, additive)
        states.append(hidden)
        attentions.append(probs)
    return Features(output=model.classify(hidden, attention_mask), hidden=states, attentions=attentions)


def model_features(
    model: nn.Module, spec: RunSpec, feeds: dict[str, torch.Tensor], intermediates: bool = False
) -> Features:
    """Output (and, with ``intermediates``, hidden states and attentions) of one batch."""
    if spec.kind == "plain":
        if not intermediates:
            return Features(output=model(feeds["input_ids"], feeds["attention_mask"]))
        assert isinstance(model, PlainTransformerClassifier)
        return _plain_features(model, feeds["input_ids"], feeds["attention_mask"])
    kwargs = {name: feeds[name] for name in spec.input_names if name in feeds}
    out = model(**kwargs, output_hidden_states=intermediates, output_attentions=intermediates)
    if spec.task == "feature-extraction":
        output = pool(out.last_hidden_state, feeds["attention_mask"], spec.pooling, spec.normalize)
    else:
        output = out.logits
    if not intermediates:
        return Features(output=output)
    return Features(output=output, hidden=list(out.hidden_states), attentions=list(out.attentions))


class DistillStudent(nn.Module):
    """The student plus learned width projections; ``forward`` returns the mapped features.

    ``hidden_map`` pairs (student hidden index, teacher hidden index); ``attention_map`` pairs
    (student layer, teacher layer). The output is a dict of tensors and lists of tensors so that
    DistributedDataParallel can follow it.
    """

    def __init__(
        self,
        student: nn.Module,
        spec: RunSpec,
        hidden_map: Sequence[tuple[int, int]],
        attention_map: Sequence[tuple[int, int]],
        student_width: int,
        teacher_width: int,
        use_hidden: bool,
        use_attention: bool,
        headless_layers: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.headless_layers = sorted(headless_layers)
        self.student = student
        self.spec = spec
        self.hidden_map = [tuple(p) for p in hidden_map] if use_hidden else []
        self.attention_map = [tuple(p) for p in attention_map] if use_attention else []
        self.projections = nn.ModuleList()
        if self.hidden_map and student_width != teacher_width:
            self.projections.extend(nn.Linear(student_width, teacher_width) for _ in self.hidden_map)
        self.embedding_projection: nn.Module | None = None
        if spec.task == "feature-extraction" and student_width != teacher_width:
            self.embedding_projection = nn.Linear(student_width, teacher_width)

    @property
    def intermediates(self) -> bool:
        return bool(self.hidden_map or self.attention_map)

    def forward(self, feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
        feats = model_features(self.student, self.spec, feeds, self.intermediates)
        output = feats.output
        if self.embedding_projection is not None:
            output = self.embedding_projection(output)
        hidden = [feats.hidden[s] for s, _ in self.hidden_map]
        if len(self.projections):
            hidden = [proj(h) for proj, h in zip(self.projections, hidden, strict=True)]
        found = feats.attentions
        if self.headless_layers and self.attention_map and self.spec.kind == "hf":
            # Transformers collects attentions from the attention modules that remain; a layer
            # whose heads were all pruned has none, so put its place back.
            rest = iter(found)
            layers = len(found) + len(self.headless_layers)
            found = [None if i in self.headless_layers else next(rest) for i in range(layers)]
        attentions = [found[s] for s, _ in self.attention_map]
        return {"output": output, "hidden": hidden, "attentions": attentions}
