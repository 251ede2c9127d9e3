"""A Llama decoder layer's forward pass in fewer torch calls, on the layer's own weights.

transformers' layer makes about forty torch calls for one token, through as many Python
frames; the products take most of a decode pass, but not all (docs/benchmarks/layers.txt:
the 30 layers' products alone 34.7-35.4 ms of a 54.1-54.7 ms token). Here q, k and v are
one product over one matrix, gate and up another (the separate weights become views of the
joined one, so nothing is held twice), q and k rotate in one call, and norms and attention
go straight to torch: 49.7-50.0 ms a token, the same greedy tokens (tests compare with
transformers' model).

A joined product pays for one or two rows; for more, this CPU's BLAS runs the joined matrix
slower than its parts (docs/benchmarks/layers.txt, passes of 4 and 8 rows), so those take
the parts, still views of the one matrix.

Only a plain Llama layer qualifies (no biases, SiLU, unquantized weights); any other runs
transformers' own code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meshshard.model import rowcache

JOINED_ROWS = 2


def fuse(layer: Any, config: Any) -> FusedLayer | None:
    """The fused form of `layer`, or None where it is not a plain Llama layer."""
    if type(layer).__name__ != "LlamaDecoderLayer" or getattr(config, "hidden_act", "") != "silu":
        return None
    attn, mlp = layer.self_attn, layer.mlp
    linears = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(
        not isinstance(m, nn.Linear)
        or m.bias is not None
        or type(m.weight.data) is not torch.Tensor
        for m in linears
    ):
        return None  # biases, or quantized weights (tensor subclasses)
    return FusedLayer(layer, config)


class FusedLayer:
    """Called as the layer would be, on what the shard computes once a pass for all its
    layers (the mask, rotary cos and sin)."""

    def __init__(self, layer: Any, config: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.layer_idx: int = attn.layer_idx
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scaling
        self.qkv, self.qkv_parts = _join(attn, ("q_proj", "k_proj", "v_proj"))
        self.gate_up, self.gate_up_parts = _join(mlp, ("gate_proj", "up_proj"))
        self.o: torch.Tensor = attn.o_proj.weight
        self.down: torch.Tensor = mlp.down_proj.weight
        self.norms: list[tuple[torch.Tensor, float]] = [
            (n.weight, n.variance_epsilon)
            for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]

    @staticmethod
    def _product(x: torch.Tensor, joined: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        if x.shape[1] <= JOINED_ROWS:
            return F.linear(x, joined)
        return torch.cat([F.linear(x, p) for p in parts], dim=-1)

    def __call__(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """h: [1, positions, hidden]; cos, sin: [1, 1, positions, head_dim]; `cache` a
        KVCache or rowcache.RowCaches (then `mask` is None: rows attend to their own)."""
        b, n, _ = h.shape
        heads, kv = self.heads, self.kv_heads
        x = _rms_norm(h, *self.norms[0])
        qkv = self._product(x, self.qkv, self.qkv_parts)
        qkv = qkv.view(b, n, heads + 2 * kv, self.head_dim).transpose(1, 2)
        qk = _rotate(qkv[:, : heads + kv], cos, sin)
        keys, values = cache.update(qk[:, heads:], qkv[:, heads + kv :], self.layer_idx)
        out = rowcache.attend(qk[:, :heads], keys, values, mask, self.scaling)
        h = h + F.linear(out.reshape(b, n, heads * self.head_dim), self.o)
        x = _rms_norm(h, *self.norms[1])
        gate, up = self._product(x, self.gate_up, self.gate_up_parts).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, self.down)


def _join(module: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One matrix of the named linears' weights stacked; each linear keeps a view of its rows
    (returned too)."""
    joined = torch.cat([getattr(module, n).weight.detach() for n in names])
    start, parts = 0, []
    for name in names:
        linear = getattr(module, name)
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(joined[start : start + rows], requires_grad=False)
        parts.append(linear.weight)
        start += rows
    return joined, parts


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
