"""A Llama decoder layer's forward pass in fewer torch calls, on the layer's own weights.

transformers' layer makes about forty torch calls for one token, through as many Python
frames; the products take most of a decode pass, but not all (docs/benchmarks/layers.txt:
the 30 layers' products alone 34.7-35.4 ms of a 54.1-54.7 ms token). Here q, k and v are
one product over one matrix, gate and up another (the separate weights become views of the
joined one, so nothing is held twice), q and k rotate in one call, and norms and attention
go straight to torch: 49.7-50.0 ms a token, the same greedy tokens (tests compare with
transformers' model).

Each product runs in the form its shard chose for the pass's rows (meshshard.model.products:
for 4 to 12 rows this CPU's BLAS runs a matrix faster a block of its rows at a time).

Only a plain Llama layer qualifies (no biases, SiLU, unquantized weights); any other runs
transformers' own code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meshshard.model import products, rowcache
from meshshard.model.products import BLOCKED, LINEAR, PARTS, TURNED, Product


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
        self.qkv = _join(attn, ("q_proj", "k_proj", "v_proj"))
        self.gate_up = _join(mlp, ("gate_proj", "up_proj"))
        self.o = Product(attn.o_proj.weight.detach())
        self.down = Product(mlp.down_proj.weight.detach())
        self.norms: list[tuple[torch.Tensor, float]] = [
            (n.weight, n.variance_epsilon)
            for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]

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
        qkv = self.qkv(x)
        qkv = qkv.view(b, n, heads + 2 * kv, self.head_dim).transpose(1, 2)
        qk = _rotate(qkv[:, : heads + kv], cos, sin)
        keys, values = cache.update(qk[:, heads:], qkv[:, heads + kv :], self.layer_idx)
        out = rowcache.attend(qk[:, :heads], keys, values, mask, self.scaling)
        h = h + self.o(out.reshape(b, n, heads * self.head_dim))
        x = _rms_norm(h, *self.norms[1])
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


def choose_products(layers: list[FusedLayer], timer: products.Timer = products._seconds) -> None:
    """Time the forms of the layers' products, all of a shape together (once a process)."""
    joined = [p for f in layers for p in (f.qkv, f.gate_up)]
    products.choose(joined, (LINEAR, PARTS, BLOCKED, TURNED), timer)
    products.choose([p for f in layers for p in (f.o, f.down)], (LINEAR, BLOCKED, TURNED), timer)


def _join(module: nn.Module, names: tuple[str, ...]) -> Product:
    """The product of one matrix of the named linears' weights stacked; each linear keeps a
    view of its rows."""
    joined = torch.cat([getattr(module, n).weight.detach() for n in names])
    start = 0
    for name in names:
        linear = getattr(module, name)
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(joined[start : start + rows], requires_grad=False)
        start += rows
    return Product(joined, [getattr(module, n).weight.shape[0] for n in names])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
