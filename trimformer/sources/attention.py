"""The plain model's self-attention, written out from its packed Q/K/V projection.

One implementation for every caller: the plain model's forward (and so its ONNX export), the
pruned plain model that head pruning leaves, and distillation, which also needs the attention
probabilities. ``nn.MultiheadAttention``'s functional form bakes the traced batch size into its
reshapes; this one uses -1 for the head axis, so it exports with dynamic shapes and in the Q/K/V
pattern that fusion and head pruning recognise.

The head count is read from the weights (``in_proj_weight`` holds Q, K and V stacked, each
``heads x head_dim`` rows), because head pruning shrinks each layer separately.

Every head pruned: the attention contributes what its output projection makes of an empty
context, i.e. the projection's bias (zeros without one), and no probabilities. That is exactly
what the ONNX prune pass leaves for such a layer (``_remove_branch`` in
:mod:`trimformer.passes.prune.surgery` turns ``stream + attention`` into ``stream + output bias``),
so the torch and ONNX sides agree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AttentionResult", "packed_qkv_attention"]


class AttentionResult(NamedTuple):
    output: torch.Tensor  # [batch, sequence, hidden], after the output projection
    # [batch, heads, query, key] softmax before dropout; None when every head was pruned.
    probs: torch.Tensor | None


def packed_qkv_attention(
    attn: nn.MultiheadAttention,
    hidden: torch.Tensor,
    additive: torch.Tensor,
    head_dim: int,
    training: bool,
) -> AttentionResult:
    """Self-attention of ``hidden`` [batch, sequence, hidden] under ``additive`` [batch, key], the
    mask added to the scores (0 for a real token, a large negative number for padding)."""
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    size = weight.shape[0] // 3
    if size == 0:
        # Projecting a zero-width context yields the bias alone (or zeros), and keeps any hook
        # on the output projection (pruning's masks, Fisher scores) in the call path.
        return AttentionResult(attn.out_proj(hidden.new_zeros(*hidden.shape[:-1], 0)), None)

    def project(part: int) -> torch.Tensor:
        rows = slice(part * size, (part + 1) * size)
        x = F.linear(hidden, weight[rows], None if bias is None else bias[rows])
        return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)  # split the heads

    query, key, value = project(0), project(1), project(2)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(head_dim)
    probs = torch.softmax(scores + additive[:, None, None, :], dim=-1)
    context = torch.matmul(F.dropout(probs, attn.dropout, training), value).transpose(1, 2)
    return AttentionResult(attn.out_proj(context.reshape(hidden.shape[0], hidden.shape[1], -1)), probs)
