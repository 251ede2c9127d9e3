"""Planning time on the paper's testbed and on random meshes of all-different devices.

    python tools/bench_planner.py [--repeats 3]

Prints a table: instance, devices, units, objective, mode (exact or approximate with its
certified bound), median planning time. `paper-70b-measured` is the paper's 15-device
Llama2-70B instance with every device's unit times off by up to 3% (seeded), as measured
profiles of devices of one kind are: 15 distinct devices. Growth with mesh size is the point
of the table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plots

from meshshard.planner import Instance, load_instance, solve
from meshshard.planner.instance import Device, Link, Unit

PEERS = Path(__file__).resolve().parent.parent / "peers"


def random_mesh(devices: int, units: int, seed: int) -> Instance:
    """Devices of unequal speed and memory, each on its own uplink; a hop takes the slower one."""
    rng = random.Random(seed)
    unit_list = tuple(Unit(f"U{i}", 0.75e9, 65536) for i in range(units))
    total = sum(u.mem for u in unit_list)
    devs, uplinks = [], {}
    for i in range(devices):
        speed = rng.uniform(0.5, 8.0)
        ms = tuple(round(speed * rng.uniform(0.95, 1.05), 4) for _ in range(units))
        mem = rng.uniform(0.15, 0.6) * total
        devs.append(Device(f"dev{i}", mem, ms))
        uplinks[f"dev{i}"] = Link(rng.choice([10.0, 100.0, 300.0, 1000.0]), rng.uniform(0.5, 5))
    pairs = tuple(
        (a.name, b.name, min(uplinks[a.name], uplinks[b.name], key=lambda k: k.mbps))
        for i, a in enumerate(devs)
        for b in devs[i + 1 :]
    )
    return Instance(unit_list, tuple(devs), Link(1000, 1), pairs, "dev0")


def as_measured(inst: Instance, seed: int, spread: float = 0.03) -> Instance:
    """Every device's unit times off by up to `spread` either way, as measured profiles are:
    devices of one kind stop being identical, so exact grouping no longer merges them."""
    rng = random.Random(seed)
    devices = tuple(
        replace(d, ms=tuple(t * rng.uniform(1 - spread, 1 + spread) for t in d.ms))
        for d in inst.devices
    )
    return replace(inst, devices=devices)


def timed(inst: Instance, objective: str, repeats: int) -> tuple[float, str]:
    times, mode = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        plan = solve(inst, objective)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
        mode = "exact" if plan.exact else f"approx <= {plan.bound:.3f}x"
    return statistics.median(times) * 1e3, mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name in ("paper-llama2-7b", "paper-llama2-13b", "paper-llama2-70b"):
        inst = load_instance(PEERS / f"{name}.json")
        for objective in ("latency", "throughput"):
            ms, mode = timed(inst, objective, args.repeats)
            rows.append((name, len(inst.devices), inst.n, objective, mode, ms))
    # The paper's scale with measured profiles: 15 distinct devices.
    inst = as_measured(load_instance(PEERS / "paper-llama2-70b.json"), seed=70)
    for objective in ("latency", "throughput"):
        ms, mode = timed(inst, objective, args.repeats)
        rows.append(("paper-70b-measured", len(inst.devices), inst.n, objective, mode, ms))
    for count in (4, 8, 10, 12, 16, 32, 64):
        inst = random_mesh(count, 34, seed=count)
        for objective in ("latency", "throughput"):
            ms, mode = timed(inst, objective, args.repeats)
            rows.append((f"random-{count}", count, inst.n, objective, mode, ms))
    line = "{:<18} {:>7} {:>5}  {:<10} {:<18} {:>9}"
    print(line.format("instance", "devices", "units", "objective", "mode", "plan ms"))
    for name, devices, units, objective, mode, ms in rows:
        print(line.format(name, devices, units, objective, mode, f"{ms:.1f}"))
    groups: dict[str, dict[str, float]] = {}
    for name, _, _, objective, _, ms in rows:
        groups.setdefault(name, {})[objective] = ms
    plots.bars("planner", "Time to plan (exact DP or certified approximation)", "ms", groups)


if __name__ == "__main__":
    main()
