"""The decoder graph with a KV cache, written over a loaded model's own modules.

:class:`CachedDecoder` maps the causal-LM graph contract (:mod:`trimformer.formats.decoder`):
``input_ids``, ``attention_mask`` over past + new tokens, ``position_ids`` and one past key and
value per layer, to ``logits`` and one present key and value per layer. It reuses the Hugging Face
model's embeddings, norms, projections, MLPs and rotary frequencies, and spells out only what
tracing must see as tensor operations: the cache concatenation and the attention mask (causal,
padding and, for Mistral, the sliding window). transformers' own cache and mask helpers change from
release to release and branch in Python on shapes, which a trace freezes; this module does not.

Why this is safe: the export compares it against the unmodified Hugging Face model (prompt logits
and greedy tokens), so a difference in any family fails the export instead of shipping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trimformer.formats.decoder import DecoderSpec

__all__ = ["CachedDecoder"]


def _attention_bias(
    attention_mask: torch.Tensor, new_tokens: int, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """[batch, 1, new, past + new] additive bias: 0 where a query may look, the dtype's minimum
    elsewhere (later keys, padding, keys beyond the sliding window)."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = keys[total - new_tokens :]
    allowed = keys[None, :] <= queries[:, None]
    if window is not None:
        allowed = allowed & (keys[None, :] > queries[:, None] - window)
    allowed = allowed[None, None, :, :] & (attention_mask[:, None, None, :] > 0)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, groups: int
) -> torch.Tensor:
    """Grouped-query attention: each KV head serves ``groups`` query heads."""
    if groups > 1:
        b, kv, t, d = k.shape
        k = k[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)
        v = v[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale + bias
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


class CachedDecoder(nn.Module):
    """See the module docstring. ``model`` is a Hugging Face ``*ForCausalLM`` of a supported family."""

    def __init__(self, model: nn.Module, spec: DecoderSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.gpt2 = spec.family == "gpt2"
        config: Any = model.config
        window = getattr(config, "sliding_window", None) if spec.family == "mistral" else None
        self.window = int(window) if window else None
        self.groups = spec.num_heads // spec.num_kv_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        model: Any = self.model
        new_tokens = input_ids.shape[1]
        if self.gpt2:
            base = model.transformer
            hidden = base.wte(input_ids) + base.wpe(position_ids)
            blocks, final_norm = base.h, base.ln_f
            rotary = None
        else:
            base = model.model
            hidden = base.embed_tokens(input_ids)
            blocks, final_norm = base.layers, base.norm
            rotary = base.rotary_emb(hidden, position_ids)
        bias = _attention_bias(attention_mask, new_tokens, self.window, hidden.dtype)
        presents: list[torch.Tensor] = []
        for index, block in enumerate(blocks):
            pair = (past[2 * index], past[2 * index + 1])
            if self.gpt2:
                hidden, present = self._gpt2_block(block, hidden, pair, bias)
            else:
                hidden, present = self._llama_block(block, hidden, pair, bias, rotary)
            presents.extend(present)
        logits = model.lm_head(final_norm(hidden))
        return (logits, *presents)

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, heads, self.spec.head_dim).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, s, _ = x.shape
        return x.transpose(1, 2).reshape(b, s, self.spec.num_heads * self.spec.head_dim)

    def _llama_block(
        self,
        block: Any,
        hidden: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        q = self._split_heads(attn.q_proj(x), self.spec.num_heads)
        k = self._split_heads(attn.k_proj(x), self.spec.num_kv_heads)
        v = self._split_heads(attn.v_proj(x), self.spec.num_kv_heads)
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        assert rotary is not None
        cos, sin = rotary[0].unsqueeze(1), rotary[1].unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat((past[0], k), dim=2)
        v = torch.cat((past[1], v), dim=2)
        context = _attend(q, k, v, bias, float(attn.scaling), self.groups)
        hidden = hidden + attn.o_proj(self._merge_heads(context))
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        return hidden, (k, v)

    def _gpt2_block(
        self, block: Any, hidden: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(hidden)).split(self.spec.hidden_size, dim=2)
        q = self._split_heads(q, self.spec.num_heads)
        k = torch.cat((past[0], self._split_heads(k, self.spec.num_heads)), dim=2)
        v = torch.cat((past[1], self._split_heads(v, self.spec.num_heads)), dim=2)
        scale = self.spec.head_dim**-0.5 if attn.scale_attn_weights else 1.0
        context = _attend(q, k, v, bias, scale, 1)
        hidden = hidden + attn.c_proj(self._merge_heads(context))
        hidden = hidden + block.mlp(block.ln_2(hidden))
        return hidden, (k, v)
