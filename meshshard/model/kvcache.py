"""Per-session KV cache for the layers of one shard, addressed by position.

Layers write in order, so each layer's cache holds positions 0..length-1 contiguously; that
makes it a plain pair of tensors per layer, easy to truncate, and to ship in a handoff.

A session's cache is allocated once for the positions its stage admitted it for
(`reserve`: its prompt and most tokens), so it never grows by copying and never holds more
than admission counted; without a reserve it grows by reallocation (256 positions, then
doubling), which can take up to twice what it uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

_GROW = 256  # tokens added per reallocation (then doubling), so decode rarely copies


class KVCache:
    """Duck-types the part of transformers' Cache that attention layers call: update().

    `layers` are the (global) decoder layers this cache is for; its length is the shortest
    of them, a layer it has nothing for counting as empty."""

    def __init__(self, layers: Iterable[int]) -> None:
        self.layers = tuple(layers)
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._lengths: dict[int, int] = {}
        self.reserved = 0  # positions to allocate at once, where they suffice

    def reserve(self, positions: int) -> None:
        """Allocate for `positions` from the next growth on (a layer already larger keeps its
        size)."""
        self.reserved = max(self.reserved, positions)

    @property
    def length(self) -> int:
        """Positions cached in every layer (the same in all of them between forward passes)."""
        return min((self._lengths.get(i, 0) for i in self.layers), default=0)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key.shape[2]
        start = self._lengths.get(layer_idx, 0)
        keys = self._keys.get(layer_idx)
        if keys is None or start + n > keys.shape[2]:
            size = self._size(keys, start + n)
            keys = self._grow(self._keys, layer_idx, key, start, size)
            self._grow(self._values, layer_idx, value, start, size)
        end = start + n
        keys[:, :, start:end] = key
        values = self._values[layer_idx]
        values[:, :, start:end] = value
        self._lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def layer(self, layer_idx: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of one layer, [1, kv_heads, length, head_dim] each,
        for at most `length` positions."""
        end = self._lengths[layer_idx] if length is None else min(length, self._lengths[layer_idx])
        return self._keys[layer_idx][:, :, :end], self._values[layer_idx][:, :, :end]

    def has(self, layer_idx: int) -> bool:
        return self.held(layer_idx) > 0

    def held(self, layer_idx: int) -> int:
        """Positions cached in one layer."""
        return self._lengths.get(layer_idx, 0)

    def put(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace one layer's cache (a handoff arriving)."""
        self._keys[layer_idx], self._values[layer_idx] = keys.clone(), values.clone()
        self._lengths[layer_idx] = keys.shape[2]

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on: they are about to be recomputed."""
        for layer_idx, n in self._lengths.items():
            self._lengths[layer_idx] = min(n, length)

    def split(self, keep: Iterable[int]) -> KVCache:
        """Move the layers in `keep` to a new cache for them; this one keeps the rest."""
        kept = KVCache(keep)
        kept.reserved = self.reserved
        for layer_idx in kept.layers:
            if layer_idx in self._lengths:
                kept._keys[layer_idx] = self._keys.pop(layer_idx)
                kept._values[layer_idx] = self._values.pop(layer_idx)
                kept._lengths[layer_idx] = self._lengths.pop(layer_idx)
        self.layers = tuple(i for i in self.layers if i not in kept.layers)
        return kept

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values())
        )

    def _size(self, old: torch.Tensor | None, need: int) -> int:
        if self.reserved >= need:
            return self.reserved
        return max(need, 2 * (old.shape[2] if old is not None else 0), _GROW)

    @staticmethod
    def _grow(
        store: dict[int, torch.Tensor], layer_idx: int, like: torch.Tensor, used: int, size: int
    ) -> torch.Tensor:
        old = store.get(layer_idx)
        shape = (like.shape[0], like.shape[1], size, like.shape[3])
        new = torch.empty(shape, dtype=like.dtype, device=like.device)
        if old is not None:
            new[:, :, :used] = old[:, :, :used]
        store[layer_idx] = new
        return new
