"""A model's shape as planning units: `embed`, one unit per decoder layer, `head`.

A shard is a contiguous unit range [start, end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EMBED = "embed"
HEAD = "head"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelSpec:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            name=name or getattr(config, "_name_or_path", "") or config.model_type,
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def linear_inputs(self) -> tuple[int, ...]:
        """The input widths of a decoder layer's linear layers (q/k/v and gate/up read the
        hidden state, o the heads, down the MLP's inner width)."""
        return (self.hidden_size, self.num_heads * self.head_dim, self.intermediate_size)

    @property
    def num_units(self) -> int:
        return self.num_layers + 2

    def unit_name(self, unit: int) -> str:
        self.check_range(unit, unit + 1)
        if unit == 0:
            return EMBED
        if unit == self.num_units - 1:
            return HEAD
        return f"L{unit - 1}"

    @property
    def unit_names(self) -> list[str]:
        return [self.unit_name(u) for u in range(self.num_units)]

    def layer_of(self, unit: int) -> int | None:
        """The decoder layer index a unit runs, or None for embed/head."""
        return unit - 1 if 0 < unit < self.num_units - 1 else None

    def check_range(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.num_units:
            raise ValueError(f"unit range [{start}, {end}) outside 0..{self.num_units}")

    def kv_bytes_per_token(self, unit: int, dtype_bytes: int) -> int:
        if self.layer_of(unit) is None:
            return 0
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def out_bytes_per_token(self, unit: int, dtype_bytes: int) -> int:
        """What the unit sends on: a hidden state, or a sampled token id from the head."""
        return 4 if unit == self.num_units - 1 else self.hidden_size * dtype_bytes
