"""A batched pass's cache: each session's packed positions write to its own cache and
attend there."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshshard.model.kvcache import KVCache
from meshshard.model.rowcache import RowCaches, Rows, attention

HEADS, KV_HEADS, DIM = 4, 2, 8


def _filled(n: int) -> KVCache:
    cache = KVCache([0])
    cache.update(torch.randn(1, KV_HEADS, n, DIM), torch.randn(1, KV_HEADS, n, DIM), 0)
    return cache


def test_rows_are_views_of_each_sessions_cache_not_copies() -> None:
    caches = [_filled(5), _filled(9)]
    key, value = torch.randn(1, KV_HEADS, 4, DIM), torch.randn(1, KV_HEADS, 4, DIM)
    keys, _ = RowCaches(caches, [1, 3]).update(key, value, 0)
    assert isinstance(keys, Rows)
    assert [caches[0].length, caches[1].length] == [6, 12]
    for cache, k, (a, b) in zip(caches, keys.keys, [(0, 1), (1, 4)], strict=True):
        stored, _ = cache.layer(0)
        assert k.data_ptr() == stored.data_ptr()  # the cache itself: nothing was copied
        torch.testing.assert_close(k[:, :, -(b - a) :], key[:, :, a:b])


def test_packed_attention_equals_each_session_alone() -> None:
    caches = [_filled(5), _filled(9), _filled(2)]
    widths = [1, 3, 2]  # a decode step, a draft or a prompt's slice, another
    query = torch.randn(1, HEADS, sum(widths), DIM)
    keys, values = RowCaches(caches, widths).update(
        torch.randn(1, KV_HEADS, sum(widths), DIM), torch.randn(1, KV_HEADS, sum(widths), DIM), 0
    )
    out, _ = attention(None, query, keys, values, None, scaling=DIM**-0.5)
    assert out.shape == (1, sum(widths), HEADS, DIM)
    start = 0
    for b, w in enumerate(widths):
        k, v = caches[b].layer(0)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        n = k.shape[2]
        causal = torch.arange(n)[None, :] <= torch.arange(n - w, n)[:, None]
        q = query[:, :, start : start + w]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        torch.testing.assert_close(out[0, start : start + w], want[0].transpose(0, 1))
        start += w
