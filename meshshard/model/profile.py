"""Per-unit profile of this device: what the planner needs to know about it.

Decode time is measured per unit while decoding after a real context, median of several
runs; prefill time per token from one longer prefill. Bytes come from the loaded modules.
The quick profile loads only embed, one decoder layer and the head (decoder layers share a
shape, so they share a time): a device that cannot hold the model can still profile itself.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from meshshard.model.kvcache import KVCache
from meshshard.model.shard import Shard
from meshshard.model.spec import ModelSpec

logger = logging.getLogger(__name__)


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

    @classmethod
    def from_json(cls, data: dict[str, object]) -> DeviceProfile:
        units = [UnitProfile(**u) for u in data["units"]]  # type: ignore[attr-defined]
        fields = {k: data[k] for k in ("model", "dtype", "device", "threads", "context")}
        return cls(units=units, **fields)  # type: ignore[arg-type]


SUSTAIN_SECONDS = 0.6


def profile(shards: Sequence[Shard], context: int = 64, repeats: int = 15) -> DeviceProfile:
    """Profile the units of `shards`; decoder layers not loaded take the measured layers' median."""
    spec = shards[0].spec
    dtype_bytes = torch.tensor([], dtype=shards[0].dtype).element_size()
    prompt = torch.randint(
        0, spec.vocab_size, (context,), generator=torch.Generator().manual_seed(0)
    )
    prefill: dict[int, list[float]] = defaultdict(list)
    decode: dict[int, list[float]] = defaultdict(list)
    weights: dict[int, int] = {}
    for shard in shards:
        x = prompt if shard.is_first else torch.randn(context, spec.hidden_size).to(shard.dtype)
        shard.forward(shard.new_cache(), x[:8], torch.arange(8))  # warm-up: first calls allocate
        cache = shard.new_cache()
        shard.forward(cache, x, torch.arange(context), lambda u, s: prefill[u].append(s))
        for step in range(repeats):
            position = torch.tensor([context + step])
            shard.forward(cache, x[-1:], position, lambda u, s: decode[u].append(s))
        _sustain(shard, cache, x[-1:], context + repeats, decode)
        for unit in range(shard.start, shard.end):
            weights[unit] = shard.unit_weight_bytes(unit)
    return DeviceProfile(
        model=spec.name,
        dtype=str(shards[0].dtype).removeprefix("torch."),
        device=platform.node(),
        threads=torch.get_num_threads(),
        context=context,
        units=_fill(spec, prefill, decode, weights, context, dtype_bytes),
    )


def quick_profile(
    model_dir: Path, dtype: str, context: int = 64, repeats: int = 15
) -> DeviceProfile:
    """Profile embed, the first decoder layer and the head; the other layers are the same shape."""
    from meshshard.model.costs import read_spec

    n = read_spec(model_dir).num_units
    shards = [Shard.load(model_dir, 0, 2, dtype), Shard.load(model_dir, n - 1, n, dtype)]
    return profile(shards, context, repeats)


def cached_quick_profile(model_dir: Path, dtype: str, folder: Path) -> DeviceProfile:
    """The quick profile of this device, measured once and kept in `folder`."""
    from meshshard.model.source import locked, model_name

    name = f"{model_name(model_dir)}-{dtype}-{platform.node()}-{compute_budget()}.json"
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # Peers sharing a machine profile one at a time (whatever their folders): concurrent runs
    # would measure each other.
    with locked(model_dir.parent / "profiling.lock"):
        try:
            return DeviceProfile.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        result = quick_profile(model_dir, dtype)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json()))
        tmp.replace(path)
    logger.info("profiled this device: %.1f ms per token for the whole model", result.decode_ms)
    return result


def _sustain(
    shard: Shard, cache: KVCache, x: torch.Tensor, position: int, decode: dict[int, list[float]]
) -> None:
    """Scale the shard's unit times to its sustained speed. Medians of short bursts miss
    what a CPU quota (a cgroup, a slower share of a machine) takes back over time: steps run
    back to back for SUSTAIN_SECONDS show it."""
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < SUSTAIN_SECONDS and steps < 2000:
        shard.forward(cache, x, torch.tensor([position + steps]))
        steps += 1
    burst = sum(statistics.median(decode[u]) for u in range(shard.start, shard.end))
    scale = (elapsed / steps) / burst if burst > 0 else 1.0
    for u in range(shard.start, shard.end):
        decode[u] = [t * scale for t in decode[u]]


def compute_budget() -> str:
    """What this process may compute with: torch's threads and any cgroup CPU quota. A
    profile holds only for the same budget (a peer limited to a quarter core is slower)."""
    budget = f"t{torch.get_num_threads()}"
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        group = next(p.split(":", 2)[2] for p in lines if "cpu" in p.split(":")[1].split(","))
        base = Path("/sys/fs/cgroup/cpu") / group.lstrip("/")
        quota = int((base / "cpu.cfs_quota_us").read_text())
        period = int((base / "cpu.cfs_period_us").read_text())
    except (OSError, StopIteration, ValueError, IndexError):
        return budget
    return f"{budget}-cpu{quota / period:.2f}" if quota > 0 else budget


def _fill(
    spec: ModelSpec,
    prefill: dict[int, list[float]],
    decode: dict[int, list[float]],
    weights: dict[int, int],
    context: int,
    dtype_bytes: int,
) -> list[UnitProfile]:
    layers = [u for u in decode if spec.layer_of(u) is not None]
    typical = layers[0] if layers else None
    out = []
    for u in range(spec.num_units):
        src = u if u in decode else typical
        if src is None:
            raise ValueError(f"unit {spec.unit_name(u)} was not profiled")
        out.append(
            UnitProfile(
                name=spec.unit_name(u),
                decode_ms=round(statistics.median(decode[src]) * 1e3, 4),
                prefill_ms_per_token=round(prefill[src][0] * 1e3 / context, 4),
                weight_bytes=weights.get(u, weights[src]),
                kv_bytes_per_token=spec.kv_bytes_per_token(u, dtype_bytes),
                out_bytes_per_token=spec.out_bytes_per_token(u, dtype_bytes),
            )
        )
    return out
