"""Per-unit profile of this device: what the planner needs to know about it.

Decode time is measured per unit while decoding after a real context, median of several
runs; prefill time per token from one longer prefill. Bytes come from the loaded modules.
"""

from __future__ import annotations

import platform
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from meshshard.model.generate import LocalChain
from meshshard.model.kvcache import KVCache


@dataclass(frozen=True)
class UnitProfile:
    name: str
    decode_ms: float
    prefill_ms_per_token: float
    weight_bytes: int
    kv_bytes_per_token: int
    out_bytes_per_token: int


@dataclass(frozen=True)
class DeviceProfile:
    model: str
    dtype: str
    device: str
    threads: int
    context: int
    units: list[UnitProfile]

    @property
    def decode_ms(self) -> float:
        return sum(u.decode_ms for u in self.units)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["decode_ms"] = round(self.decode_ms, 4)
        return out


def profile(chain: LocalChain, context: int = 64, repeats: int = 15) -> DeviceProfile:
    """Profile every unit of a one-shard chain (the whole model on this device)."""
    (shard,) = chain.shards
    spec = shard.spec
    dtype_bytes = torch.tensor([], dtype=shard.dtype).element_size()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, spec.vocab_size, (context,), generator=generator)

    prefill: dict[int, list[float]] = defaultdict(list)
    decode: dict[int, list[float]] = defaultdict(list)
    shard.forward(KVCache(), prompt[:8], torch.arange(8))  # warm-up: first calls allocate
    cache = KVCache()
    shard.forward(cache, prompt, torch.arange(context), lambda u, s: prefill[u].append(s))
    token = prompt[-1:]
    for step in range(repeats):
        position = torch.tensor([context + step])
        shard.forward(cache, token, position, lambda u, s: decode[u].append(s))

    units = [
        UnitProfile(
            name=spec.unit_name(u),
            decode_ms=round(statistics.median(decode[u]) * 1e3, 4),
            prefill_ms_per_token=round(prefill[u][0] * 1e3 / context, 4),
            weight_bytes=shard.unit_weight_bytes(u),
            kv_bytes_per_token=spec.kv_bytes_per_token(u, dtype_bytes),
            out_bytes_per_token=spec.out_bytes_per_token(u, dtype_bytes),
        )
        for u in range(spec.num_units)
    ]
    return DeviceProfile(
        model=spec.name,
        dtype=str(shard.dtype).removeprefix("torch."),
        device=platform.node(),
        threads=torch.get_num_threads(),
        context=context,
        units=units,
    )
