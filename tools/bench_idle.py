"""What a pass costs after its thread has been idle: the shards of bench_chain's 3-peer chain,
in one process, one thread, run back to back and with a sleep before each shard's pass.

    python tools/bench_idle.py [--steps 60] [--rounds 3] [--nap-ms 20]

In a chain a stage waits while the others compute (for one answer, two thirds of the time
with 3 stages). This times what that wait alone does to a pass's CPU time on this machine,
without sockets, processes or the event loop: the model thread's CPU ms per pass of each
shard (mean over --steps decode steps), both ways, in turns, --rounds times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

CUTS = (4, 21)  # where the 3-peer mesh of bench_chain (300 MB each) cuts the model


def timed(chain, nap: float, steps: int) -> list[float]:
    """CPU ms per decode pass of each shard, after `nap` seconds asleep before each."""
    import torch

    session = "idle"
    x = torch.arange(20)
    for shard in chain.shards:
        x = shard.prefill(session, x)
    token = torch.tensor([int(x.argmax())])
    spent = [0.0] * len(chain.shards)
    for _ in range(steps):
        x = token
        for i, shard in enumerate(chain.shards):
            if nap:
                time.sleep(nap)
            start = time.thread_time()
            x = shard.decode_batch([session], [x])[0]
            spent[i] += time.thread_time() - start
        token = torch.tensor([int(x.argmax())])
    chain.drop(session)
    return [s * 1000 / steps for s in spent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nap-ms", type=float, default=20.0)
    args = parser.parse_args()
    import torch
    from bench_chain import embedded_model

    from meshshard.model.generate import LocalChain

    torch.set_num_threads(1)
    chain = LocalChain.load(embedded_model(), CUTS)
    units = [f"[{s.start},{s.end})" for s in chain.shards]
    print(f"SmolLM2-135M float32, 1 thread, shards {' '.join(units)}; model thread CPU ms per "
          f"pass, mean of {args.steps} decode steps")  # fmt: skip
    print(f"{'round':>5} {'way':<22} " + " ".join(f"{u:>9}" for u in units) + f" {'sum':>7}")
    sums: dict[str, list[float]] = {"back to back": [], "asleep before": []}
    for r in range(1, args.rounds + 1):
        for way, nap in (("back to back", 0.0), ("asleep before", args.nap_ms / 1000)):
            ms = timed(chain, nap, args.steps)
            sums[way].append(sum(ms))
            name = way if not nap else f"{way} ({args.nap_ms:g} ms)"
            print(f"{r:>5} {name:<22} " + " ".join(f"{m:>9.2f}" for m in ms) + f" {sum(ms):>7.2f}")
    ratios = [b / a for a, b in zip(sums["back to back"], sums["asleep before"], strict=True)]
    print("asleep / back to back, each round: " + ", ".join(f"{x:.3f}" for x in ratios)
          + f"; median {statistics.median(ratios):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
