"""Planner instances from device profiles (what `meshshard profile` measures and peers gossip)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshshard.planner.instance import Device, Instance, InstanceError, Link, Unit
from meshshard.types import UnitCost


def units_from_profile(profile: Mapping[str, Any]) -> list[UnitCost]:
    return [
        UnitCost(
            u["name"],
            int(u["weight_bytes"]),
            int(u["kv_bytes_per_token"]),
            int(u["out_bytes_per_token"]),
        )
        for u in profile["units"]
    ]


def build_instance(
    units: Sequence[UnitCost],
    devices: Sequence[tuple[str, float, Sequence[float]] | tuple[str, float, Sequence[float], str]],
    source: str,
    context_tokens: int,
    default_link: Link,
    pairs: Sequence[tuple[str, str, Link]] = (),
    directed: Sequence[tuple[str, str, Link]] = (),
) -> Instance:
    """Unit memory = weights + KV cache for `context_tokens`; activations are one token's."""
    if context_tokens < 0:
        raise InstanceError("context_tokens must be non-negative")
    return Instance(
        units=tuple(
            Unit(
                u.name,
                u.weight_bytes + u.kv_bytes_per_token * context_tokens,
                u.out_bytes_per_token,
            )
            for u in units
        ),
        devices=tuple(Device(d[0], d[1], tuple(d[2]), *d[3:]) for d in devices),
        default_link=default_link,
        pairs=tuple(pairs),
        source=source,
        return_bytes=4,
        directed=tuple(directed),
    )
