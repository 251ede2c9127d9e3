"""Per-session KV cache for the layers of one shard, addressed by position.

Layers write in order, so each layer's cache holds positions 0..length-1 contiguously; that
makes it a plain pair of tensors per layer, easy to ship in a handoff.
"""

from __future__ import annotations

from typing import Any

import torch

_GROW = 256  # tokens added per reallocation (then doubling), so decode rarely copies


class KVCache:
    """Duck-types the part of transformers' Cache that attention layers call: update()."""

    def __init__(self) -> None:
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._lengths: dict[int, int] = {}

    @property
    def length(self) -> int:
        """Tokens cached (the same in every layer between forward passes)."""
        return max(self._lengths.values(), default=0)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key.shape[2]
        start = self._lengths.get(layer_idx, 0)
        keys = self._keys.get(layer_idx)
        if keys is None or start + n > keys.shape[2]:
            keys = self._grow(self._keys, layer_idx, key, start, start + n)
            self._grow(self._values, layer_idx, value, start, start + n)
        end = start + n
        keys[:, :, start:end] = key
        values = self._values[layer_idx]
        values[:, :, start:end] = value
        self._lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of one layer, [1, kv_heads, length, head_dim] each."""
        end = self._lengths[layer_idx]
        return self._keys[layer_idx][:, :, :end], self._values[layer_idx][:, :, :end]

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (*self._keys.values(), *self._values.values())
        )

    @staticmethod
    def _grow(
        store: dict[int, torch.Tensor], layer_idx: int, like: torch.Tensor, used: int, need: int
    ) -> torch.Tensor:
        old = store.get(layer_idx)
        capacity = max(need, 2 * (old.shape[2] if old is not None else 0), _GROW)
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        new = torch.empty(shape, dtype=like.dtype, device=like.device)
        if old is not None:
            new[:, :, :used] = old[:, :, :used]
        store[layer_idx] = new
        return new
