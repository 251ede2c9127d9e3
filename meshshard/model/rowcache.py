"""Several sessions' KV caches in one forward pass, without copying them or padding rows.

A batched pass packs its sessions' new positions one after another into a single sequence
([1, positions, hidden]): a decode step's one token, a draft's few, a prompt's slice, with
no padding, so a pass that carries a prompt slice beside decode steps costs its positions
and not rows x the longest one. Each session's run of positions writes to that session's
cache and attends to that cache where it lies. Padding every session's keys into one
[batch, heads, longest, dim] tensor per layer would copy every cached position on every step
(measured on SmolLM2-135M, 8 rows: 8% of a pass at 60 positions, 44% at 1,000); instead
attention runs session by session on views of the caches, through an attention function
registered with transformers under ATTENTION. Anything but such runs goes to the library's
own SDPA, so the model runs unchanged outside batched passes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from meshshard.model.kvcache import KVCache

ATTENTION = "meshshard_rows"


@dataclass(frozen=True)
class Rows:
    """What a batched layer's cache update hands attention in place of keys: each session's
    keys and values as views of its cache, and how many packed positions are its."""

    keys: list[torch.Tensor]  # [1, kv_heads, cached, head_dim] each
    values: list[torch.Tensor]
    spans: list[tuple[int, int]]  # where each session's new positions lie in the packed pass


class RowCaches:
    """Duck-types the part of transformers' Cache that attention layers call, for a packed
    batch: the first widths[0] positions go to caches[0], the next widths[1] to caches[1]..."""

    def __init__(self, caches: list[KVCache], widths: list[int]) -> None:
        self.caches = caches
        ends = list(itertools.accumulate(widths))  # once a pass, not once a layer
        self.spans = [(end - w, end) for w, end in zip(widths, ends, strict=True)]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[Rows, Rows]:
        keys, values = [], []
        for cache, (a, b) in zip(self.caches, self.spans, strict=True):
            k, v = cache.update(key[:, :, a:b], value[:, :, a:b], layer_idx)
            keys.append(k)
            values.append(v)
        rows = Rows(keys, values, self.spans)
        return rows, rows


def attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor | Rows,
    value: torch.Tensor | Rows,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Session by session for a packed batch (query [1, heads, positions, dim]); the
    library's SDPA otherwise. Returns [1, positions, heads, dim]."""
    if not isinstance(key, Rows):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        assert not isinstance(value, Rows)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return attend(query, key, value, None, scaling), None


def attend(
    query: torch.Tensor,
    key: torch.Tensor | Rows,
    value: torch.Tensor | Rows,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of query [1, heads, positions, dim] to one session's keys (under `mask`),
    or to each packed session's own; [1, positions, heads, dim]."""
    if not isinstance(key, Rows):
        assert not isinstance(value, Rows)
        return _sdpa(query, key, value, mask, scaling).transpose(1, 2)
    out = torch.empty_like(query)
    for k, v, (a, b) in zip(key.keys, key.values, key.spans, strict=True):
        q = query[:, :, a:b]
        causal = None
        if b - a > 1:  # a draft's or a prompt's positions: each sees the cache up to itself
            cached = k.shape[2]
            seen = torch.arange(cached, device=q.device)
            mine = torch.arange(cached - (b - a), cached, device=q.device)
            causal = seen[None, :] <= mine[:, None]
        out[:, :, a:b] = _sdpa(q, k, v, causal, scaling)
    return out.transpose(1, 2).contiguous()


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """[1, heads, positions, dim]. One position sees every key: its heads that share a key
    head are then that head's queries, one call without repeating keys (as transformers'
    SDPA does for one query)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if q.shape[2] == 1 and mask is None:
        packed = q.reshape(1, kv_heads, heads // kv_heads, q.shape[3])
        out = F.scaled_dot_product_attention(packed, k, v, scale=scaling)
        return out.reshape(q.shape)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


def register() -> None:
    """Make ATTENTION a name transformers' attention layers accept (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, attention)
