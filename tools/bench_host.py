"""The most this host's cores give 8 answers at once, before any chain.

issue 19 asks a 3-peer mesh for one answer at 0.95 of a single process and for 8 answers at
3.5x one answer: together, 8 answers at 0.95 x 3.5 = 3.33 times the single process's
tokens/s. This asks whether the host has that much in it at all. No mesh, no hops, no event
loop: whole-model processes (SmolLM2-135M, float32, the fused layers a stage runs) decoding
greedily with `Shard.decode_batch`, as a stage batches, in these arrangements, in turns:

- one process, one thread, one answer (the reference: what `meshshard generate` runs);
- one process, one thread, 8 answers in one pass (one wave through a chain, no bubbles);
- one process, two threads, 8 answers in one pass;
- two processes at once, one thread each, 4 answers each in one pass (two waves on the two
  cores, each a pass of 4 rows, no bubbles: what a chain's 2 waves would run at best);
- two processes at once, one thread each, one answer each (what the two cores give against
  one).

The best of the 8-answer rows is a ceiling on what 8 answers get from any arrangement of
these passes on this host; a mesh adds its hops, its per-step work and its pipeline's gaps.

    python tools/bench_host.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TARGET = 0.95 * 3.5  # issue 19's two 3-peer targets together, in single processes

# name: (rows in each process's pass, threads a process, processes at once)
SETUPS = {
    "1 process, 1 thread, 1 answer": (1, 1, 1),
    "1 process, 1 thread, 8 in a pass": (8, 1, 1),
    "1 process, 2 threads, 8 in a pass": (8, 2, 1),
    "2 processes, 4 in a pass each": (4, 1, 2),
    "2 processes, 1 answer each": (1, 1, 2),
}
REFERENCE = "1 process, 1 thread, 1 answer"


def worker() -> None:
    """Loads the model once, then for each line `rows threads tokens` on stdin decodes
    `rows` answers of `tokens` tokens in passes of all of them and prints the tokens/s."""
    import torch
    from bench_chain import PROMPT, embedded_model

    from meshshard.model.shard import Shard
    from meshshard.model.text import TextCodec

    shard = Shard.load(embedded_model(), 0, 32)
    ids = TextCodec.load(embedded_model()).encode(PROMPT, chat=True)
    print("ready", flush=True)
    for line in sys.stdin:
        rows, threads, tokens = map(int, line.split())
        torch.set_num_threads(threads)
        print(f"{decode(shard, ids, rows, tokens):.4f}", flush=True)


def decode(shard: Any, ids: list[int], rows: int, tokens: int) -> float:
    """Aggregate tokens/s of `rows` greedy answers to the prompt `ids`, asked together: their
    prompts in one pass (as a first stage batches prompts that arrive together), then a pass
    a token, `tokens` each, timed from the prompts to the last token (as bench_chain times a
    burst of answers)."""
    import torch

    from meshshard.model.generate import LocalChain, generate

    start = time.perf_counter()
    if rows == 1:  # the single process: `meshshard generate`'s own loop
        done = sum(1 for _ in generate(LocalChain([shard]), ids, tokens))
        return done / (time.perf_counter() - start)
    sessions = [f"s{time.perf_counter_ns()}-{i}" for i in range(rows)]
    with torch.inference_mode():
        first = shard.decode_batch(sessions, [torch.tensor(ids)] * rows, [1] * rows)
        nxt = [int(o.argmax()) for o in first]
        for _ in range(tokens - 1):
            out = shard.decode_batch(sessions, [torch.tensor([t]) for t in nxt])
            nxt = [int(o.argmax()) for o in out]
    spent = time.perf_counter() - start
    for s in sessions:
        shard.drop(s)
    return rows * tokens / spent


class Workers:
    """Two model processes, kept loaded, asked to decode at the same moment."""

    def __init__(self, count: int = 2) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            for _ in range(count)
        ]  # fmt: skip
        for p in self.procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("error: a model process failed to start")

    def run(self, rows: int, threads: int, processes: int, tokens: int) -> float:
        """Aggregate tokens/s of `processes` workers decoding at once."""
        busy = self.procs[:processes]
        for p in busy:
            assert p.stdin is not None
            p.stdin.write(f"{rows} {threads} {tokens}\n")
            p.stdin.flush()
        return sum(float(p.stdout.readline()) for p in busy if p.stdout is not None)

    def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in self.procs:
            p.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    workers = Workers()
    got: dict[str, list[float]] = {name: [] for name in SETUPS}
    try:
        workers.run(1, 1, 2, 8)  # warm both processes' kernels and caches
        for _ in range(args.repeats):
            for name, (rows, threads, processes) in SETUPS.items():
                got[name].append(workers.run(rows, threads, processes, args.tokens))
    finally:
        workers.close()
    report(got, args.tokens, args.repeats)


def report(got: dict[str, list[float]], tokens: int, repeats: int) -> None:
    ref = statistics.median(got[REFERENCE])
    print(f"# SmolLM2-135M float32, fused layers, {tokens} greedy tokens an answer to "
          f"bench_chain's prompt, from the prompts to the last token; aggregate tokens/s, "
          f"median of {repeats} rounds in turns")  # fmt: skip
    print(f"{'setup':36} {'tok/s':>7} {'x one':>6}  every round")
    for name, rates in got.items():
        med = statistics.median(rates)
        rounds = ", ".join(f"{r:.1f}" for r in rates)
        print(f"{name:36} {med:7.1f} {med / ref:6.2f}  {rounds}")
    eights = {n: statistics.median(r) for n, r in got.items() if SETUPS[n][0] * SETUPS[n][2] == 8}
    best = max(eights, key=lambda n: eights[n])
    print(f"# the most 8 answers got: {eights[best] / ref:.2f}x one answer ({best}); "
          f"issue 19's two 3-peer targets together ask {TARGET:.3f}x")  # fmt: skip
    pairs = [b / a for a, b in zip(got[REFERENCE], got["2 processes, 1 answer each"], strict=True)]
    print(
        f"# two cores against one, one answer each: {statistics.median(pairs):.2f}x "
        f"(each round: {', '.join(f'{p:.2f}' for p in pairs)})"
    )


if __name__ == "__main__":
    main()
