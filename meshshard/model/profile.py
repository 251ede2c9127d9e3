"""Per-unit profile of this device: what the planner needs to know about it.

Decode time is measured per unit while decoding after a real context, median of several
runs, for one session and for batches of several sessions at once (BATCHES: math libraries
pick their kernels by batch size, so the cost of a batch is not a line); prefill time per
token from one longer prefill. Bytes come from the loaded modules.
The quick profile loads embed, enough decoder layers to outgrow the CPU's caches, and the
head; decoder layers share a shape, so the others take their time. One layer alone would stay
in cache and run up to twice as fast as a chain of layers that streams its weights from memory
(decode is memory-bound). A device that cannot hold the model can still profile itself.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from meshshard.model import products
from meshshard.model.batching import BATCHES
from meshshard.model.device import Placement
from meshshard.model.kvcache import KVCache
from meshshard.model.shard import Shard
from meshshard.model.spec import ModelSpec
from meshshard.progress import progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitProfile:
    name: str
    decode_ms: float
    batch_ms: list[float]  # one step of BATCHES[k] sessions at once
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
        if any(not isinstance(u.batch_ms, list) or len(u.batch_ms) != len(BATCHES) for u in units):
            raise ValueError("a profile's batch_ms must hold one time per size in BATCHES")
        fields = {k: data[k] for k in ("model", "dtype", "device", "threads", "context")}
        return cls(units=units, **fields)  # type: ignore[arg-type]


# Bumped when the way of measuring changes, or what is measured runs differently (batched
# passes: 7, row attention and the head's product form timed at load; fused Llama layers: 8;
# every product's form timed at load, blocked products: 9; batches at the profile's context
# rather than 16 positions: 10; batched passes by CPU time on a CPU: 11; products' forms
# timed over 64 MB by CPU time, which chooses them differently for 4-7 rows: 12; batches
# timed in rounds beside one session's step: 13; timed again where implausible, by the model
# thread's own CPU time with one torch thread: 14; fifteen rounds rather than five: 15;
# W @ xᵀ timed for the decoder layers too, its output made contiguous: 17 (16 was a change
# not kept, whose profiles may still be on disk),
# so profiles kept from before are measured again. (lan-3's profiles of version 6, kept from
# before those changes, priced 4-row passes on its desk at 61 ms where they then took 41; its
# version 7, from before the fused layers, 3.8-row passes on its laptop at 111 where they
# took 129, lan-3 run 15.)
VERSION = 18  # 18: kept with the products' forms it was measured with
SUSTAIN_SECONDS = 0.6
# Rounds of one pass of each size. Five left 2 of 24 profiles with sizes 8-13% under the
# others' (docs/experiments/profile-ratios.txt), one of them lan-3's laptop's, kept for runs
# whose passes of several rows ran over its price. Fifteen: seven taken in a row spread 3-6% at
# each size (the decoder layers'), where fourteen of five spread 8-13%; one of the next ten
# (testbed hosts) still had a size off, 4 rows at 1.15-1.22x the others'.
BATCH_ROUNDS = 15
# A pass of more rows does one row's work and more, so a size timed under this share of one
# row's had its single steps slowed by something else: timed again, up to TIMINGS times in all,
# the timing whose least ratio is largest kept (lan-3's desk, version 13: 2 rows at 0.73 of
# one, 16 at 1.57, where a profile of it an hour later timed 1.15 and 2.89).
PLAUSIBLE = 0.9
TIMINGS = 3
# The quick profile runs at least this many bytes of distinct decoder layers: more than the
# last-level cache of any device we target, so no layer finds its weights still cached.
CACHE_FLUSH_BYTES = 256 * 2**20


def profile(shards: Sequence[Shard], context: int = 64, repeats: int = 15) -> DeviceProfile:
    """Profile the units of `shards`; decoder layers not loaded take the measured layers' median."""
    spec = shards[0].spec
    dtype_bytes = torch.tensor([], dtype=shards[0].dtype).element_size()
    prompt = torch.randint(
        0, spec.vocab_size, (context,), generator=torch.Generator().manual_seed(0)
    )
    prefill: dict[int, list[float]] = defaultdict(list)
    decode: dict[int, list[float]] = defaultdict(list)
    batch: dict[tuple[int, int], list[float]] = defaultdict(list)  # (unit, size): seconds
    weights: dict[int, int] = {}
    steps = repeats + BATCH_ROUNDS + 3
    with progress("profiling this device", len(shards) * steps) as advance:
        for shard in shards:
            hidden = torch.randn(context, spec.hidden_size).to(shard.dtype)
            x = prompt if shard.is_first else hidden
            shard.forward(shard.new_cache(), x[:8], torch.arange(8))  # warm-up: calls allocate
            cache = shard.new_cache()
            shard.forward(cache, x, torch.arange(context), lambda u, s: prefill[u].append(s))
            advance(1)
            for step in range(repeats):
                position = torch.tensor([context + step])
                shard.forward(cache, x[-1:], position, lambda u, s: decode[u].append(s))
                advance(1)
            _sustain(shard, cache, x[-1:], context + repeats, decode)
            advance(1)
            # A batch pass costs its shard what it took beside one session's step, at the
            # sustained speed, shared by the units as their single steps are.
            single = _single(shard, x)
            for size, ratio in _batched(shard, x, single, advance, _clock(shard)).items():
                for u in range(shard.start, shard.end):
                    batch[u, size] = [t * ratio for t in decode[u]]
            for unit in range(shard.start, shard.end):
                weights[unit] = shard.unit_weight_bytes(unit)
    return DeviceProfile(
        model=spec.name,
        dtype=str(shards[0].dtype).removeprefix("torch."),
        device=platform.node(),
        threads=torch.get_num_threads(),
        context=context,
        units=_fill(spec, prefill, decode, batch, weights, context, dtype_bytes),
    )


def quick_profile(
    model_dir: Path, placement: Placement, context: int = 64, repeats: int = 15
) -> DeviceProfile:
    """Profile embed, the first layers (CACHE_FLUSH_BYTES of them) and the head, where and
    how the peer will run them; the other layers are the same shape."""
    from meshshard.model.costs import unit_costs

    costs = unit_costs(model_dir, placement.dtype, placement.quantize)
    n = len(costs)
    layers = layers_to_profile(costs[1].weight_bytes, n - 2)
    where = (placement.dtype, str(placement.device), placement.quantize)
    shards = [Shard.load(model_dir, 0, 1 + layers, *where), Shard.load(model_dir, n - 1, n, *where)]
    return profile(shards, context, repeats)


def layers_to_profile(layer_bytes: int, num_layers: int) -> int:
    """How many decoder layers hold CACHE_FLUSH_BYTES (all of them if fewer)."""
    return min(num_layers, max(1, math.ceil(CACHE_FLUSH_BYTES / max(layer_bytes, 1))))


def cached_quick_profile(model_dir: Path, placement: Placement, folder: Path) -> DeviceProfile:
    """The quick profile of this device, measured once and kept in `folder`."""
    from meshshard.model.source import locked, model_name

    how = placement.describe().replace(" ", "-").replace(":", "")
    name = f"{model_name(model_dir)}-{how}-{platform.node()}-{compute_budget()}-v{VERSION}.json"
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # Peers sharing a machine profile one at a time (whatever their folders): concurrent runs
    # would measure each other.
    forms = path.with_suffix(".forms")
    with locked(model_dir.parent / "profiling.lock"):
        try:
            kept = DeviceProfile.from_json(json.loads(path.read_text()))
            # The products' forms it was measured with, or it prices passes not run here.
            if products.adopt(json.loads(forms.read_text())):
                return kept
        except (OSError, ValueError, KeyError, TypeError):
            pass
        result = quick_profile(model_dir, placement)
        for where, data in ((forms, products.chosen()), (path, result.to_json())):
            tmp = where.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(where)
    logger.info("profiled this device: %.1f ms per token for the whole model", result.decode_ms)
    return result


def _clock(shard: Shard) -> Callable[[], float]:
    """What a pass is timed by: CPU time on a CPU, where other work on the host, or a quota's
    pauses (a cgroup, a slower share of a machine), lengthen a few passes' wall time or not by
    when they fall (lan-3's desk, a whole core, profiled passes of 4 rows at 39.3 ms and of 8
    at 39.5 by the wall clock); the calling thread's alone where torch computes on it alone
    (one thread): a peer profiles on its model thread while its event loop answers gossip and
    link probes, whose work the whole process's CPU time would count in whichever pass it
    fell. The wall clock elsewhere, on CUDA once the device's queued kernels are done (a pass
    returns when its kernels are queued)."""
    device = shard.device
    if device.type == "cpu":
        return time.thread_time if torch.get_num_threads() == 1 else time.process_time
    if device.type != "cuda":
        return time.perf_counter

    def synced() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return synced


def _single(shard: Shard, x: torch.Tensor) -> Callable[[], object]:
    """One session's next decode step, each call, as a stage runs a lone step, after the
    prompt `x` (the batches' sessions hold the same)."""
    cache = shard.new_cache()
    shard.forward(cache, x, torch.arange(x.shape[0]))
    steps = itertools.count(x.shape[0])
    return lambda: shard.forward(cache, x[-1:], torch.tensor([next(steps)]))


def _batched(
    shard: Shard,
    x: torch.Tensor,
    single: Callable[[], object],
    advance: Callable[[int], None],
    clock: Callable[[], float],
) -> dict[int, float]:
    """The shard's decode steps of BATCHES sessions at once over one session's step (`single`),
    by size (medians by `clock`), each session holding the profile's context: a row's
    attention to its cache is an eighth to a sixth of a pass of 8 to 16 rows on a CPU
    (SmolLM2's first 17 units on this project's test host, sessions of 80 positions against
    16: passes of 4 to 16 rows +8-16%). Timed in rounds of one step of each size, the single
    one's included, so both sides of a ratio share the host's moments: timed apart, seconds
    of drift went into the ratios (this project's test host, version 12: a pass of 3 rows
    1.17-1.60 of one in four profiles taken back to back). A timing that puts a size under
    PLAUSIBLE of one row's is taken again, TIMINGS in all at most."""
    sessions = [f"profile-{i}" for i in range(max(BATCHES))]
    positions = torch.arange(x.shape[0])
    shard.prefill(sessions[0], x, positions, logits=0)
    for session in sessions[1:]:  # copies of the first one's cache: no prefill each
        if not shard.layers:
            shard.prefill(session, x, positions, logits=0)
        for layer in shard.layer_ids:
            copied = shard.export(sessions[0], layer, x.shape[0])
            assert copied is not None
            shard.install(session, layer, *copied)
    shard.decode_batch(sessions, [x[-1:]] * len(sessions))  # caches grow once, untimed
    advance(1)
    steps: dict[int, Callable[[], object]] = {1: single}
    for size in BATCHES:
        steps[size] = functools.partial(shard.decode_batch, sessions[:size], [x[-1:]] * size)
    best: dict[int, float] = {}
    for timing in range(TIMINGS):
        ratios = _rounds(steps, clock, advance if timing == 0 else lambda _: None)
        if not best or min(ratios.values()) > min(best.values()):
            best = ratios
        if min(ratios.values()) >= PLAUSIBLE:
            break
        shown = ", ".join(f"{size} rows {ratio:.2f}" for size, ratio in ratios.items())
        then = "timed again" if timing + 1 < TIMINGS else "the timing nearest it kept"
        logger.info("passes timed at %s of one row's, under %s: %s", shown, PLAUSIBLE, then)
    for session in sessions:
        shard.drop(session)
    return best


def _rounds(
    steps: dict[int, Callable[[], object]],
    clock: Callable[[], float],
    advance: Callable[[int], None],
) -> dict[int, float]:
    """BATCH_ROUNDS rounds of one step of each size: each size's median over one row's."""
    times: dict[int, list[float]] = {size: [] for size in steps}
    for _ in range(BATCH_ROUNDS):
        for size, step in steps.items():
            start = clock()
            step()
            times[size].append(clock() - start)
        advance(1)
    one = statistics.median(times[1])
    return {size: statistics.median(times[size]) / one for size in BATCHES}


def _sustain(
    shard: Shard, cache: KVCache, x: torch.Tensor, position: int, decode: dict[int, list[float]]
) -> None:
    """Scale the shard's unit times to its sustained speed. Medians of short bursts miss what
    a CPU quota (a cgroup, a slower share of a machine) takes back over time: steps run back
    to back for SUSTAIN_SECONDS show it."""
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
    batch: dict[tuple[int, int], list[float]],
    weights: dict[int, int],
    context: int,
    dtype_bytes: int,
) -> list[UnitProfile]:
    layers = [u for u in decode if spec.layer_of(u) is not None]
    out = []
    for u in range(spec.num_units):
        if layers and spec.layer_of(u) is not None:
            # Decoder layers share a shape, so every one takes the loaded layers' mean time:
            # under a CPU quota a single layer's median swings with where the quota's pauses
            # fall, while their sum (scaled to the sustained speed) holds.
            step = statistics.fmean(statistics.median(decode[v]) for v in layers)
            several = [
                statistics.fmean(statistics.median(batch[v, size]) for v in layers)
                for size in BATCHES
            ]
            prompt = statistics.fmean(prefill[v][0] for v in layers)
            size = weights.get(u, weights[layers[0]])
        elif u in decode:
            step = statistics.median(decode[u])
            several = [statistics.median(batch[u, size]) for size in BATCHES]
            prompt, size = prefill[u][0], weights[u]
        else:
            raise ValueError(f"unit {spec.unit_name(u)} was not profiled")
        out.append(
            UnitProfile(
                name=spec.unit_name(u),
                decode_ms=round(step * 1e3, 4),
                batch_ms=[round(t * 1e3, 4) for t in several],
                prefill_ms_per_token=round(prompt * 1e3 / context, 4),
                weight_bytes=size,
                kv_bytes_per_token=spec.kv_bytes_per_token(u, dtype_bytes),
                out_bytes_per_token=spec.out_bytes_per_token(u, dtype_bytes),
            )
        )
    return out
