"""Data-plane speed: single process vs 2- and 3-peer meshes on loopback, and concurrency.

    python tools/bench_chain.py [--tokens 64] [--repeats 3] [--logs DIR]

All on this machine, in one run: single-process tokens/s (`meshshard generate`'s loop) with
one thread and with torch's default (every core); three bare processes holding the 3-peer
plan's shards in a ring of pipes (tools/bench_layers.py: the floor under any chain of three
processes on this machine, with nothing of a mesh), and that ring with the head split at the
plan's share as the mesh splits a lone answer's (what the mesh's hops cost shows against
it), measured apart and again right after each of the 3-peer mesh's lone answers, in the
same minute as it; for meshes of 2 and 3 real `meshshard up`
peers of one thread each (as the demo runs them), and 3 peers of torch's default threads
(each offering too little memory to hold the model, so the chain has 2 or 3 stages): one
session's tokens/s and time to first token (its ratio against the single process of one
thread measured in turns with it, answer for answer, in the same minutes), and
aggregate tokens/s with 4 concurrent sessions, and with 1 and 8 in turns (`--repeats` pairs;
8 vs 1 is the median of the pairs' ratios, each pair measured within seconds); where one
answer's time per token goes (each stage's passes, wall and CPU); bytes sent per token per
hop; and on a 2-peer mesh (one wave) and a 3-peer mesh (two waves) with room for it, the
longest gap between the tokens of answers that are decoding while a 2,000-token prompt is
prefilled, against their usual gap; and the CPU time the
hypervisor gave to other guests while each kind of run ran (tools/steal.py). Peers decode
one token per pass (`--speculate 0`), as the single process does, and keep the mesh's
default (LAN) timings, as `meshshard up` and the demo do (the tests' shrunk timings probe
and gossip several times as often). The peers' logs go to a temporary folder, removed at the
end, or are kept in `--logs` (a peer's log, by name, holds every mesh it was part of, one
after another: the gaps' last).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import plots  # noqa: E402
from steal import Stolen  # noqa: E402
from support.procs import Peer, wait_for  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."
LONG_PROMPT_TOKENS = 2000


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def embedded_model() -> Path:
    """The default model's folder, as the peers find it."""
    from meshshard.config import Config
    from meshshard.model.source import resolve_model

    config = Config()
    return resolve_model(config.model, config.cache_dir)


def head_rows(share: float) -> int:
    """The vocabulary rows a first stage scores at a plan's head share."""
    from meshshard.chain.picks import split_rows
    from meshshard.model.costs import read_spec

    return split_rows(share, read_spec(embedded_model()).vocab_size)


class Single:
    """The single process (`meshshard generate`'s loop), its model kept loaded in this one:
    measured in turns with each mesh's lone answers, so a ratio compares the same minutes of
    a host whose speed drifts (single-process runs an hour apart differed by a fifth)."""

    def __init__(self) -> None:
        from meshshard.model.generate import LocalChain
        from meshshard.model.text import TextCodec

        model_dir = embedded_model()
        self.chain = LocalChain.load(model_dir)
        self.ids = TextCodec.load(model_dir).encode(PROMPT, chat=True)

    def answer(self, tokens: int, threads: int = 1) -> tuple[float, float]:
        """One greedy answer's decode rate after the first token, and its time to it."""
        import torch

        from meshshard.model.generate import generate

        torch.set_num_threads(threads)
        start = time.perf_counter()
        first = 0.0
        n = 0
        for _ in generate(self.chain, self.ids, tokens):
            n += 1
            if n == 1:
                first = time.perf_counter()
        end = time.perf_counter()
        torch.set_num_threads(1)
        return (n - 1) / (end - first), first - start

    def median(self, tokens: int, repeats: int, threads: int = 1) -> tuple[float, float]:
        runs = [self.answer(tokens, threads) for _ in range(repeats)]
        return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def ask(url: str, tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def long_prompt(tokens: int) -> str:
    """A prompt of about `tokens` tokens (chat template included)."""
    from meshshard.model.text import TextCodec

    codec = TextCodec.load(embedded_model())
    text, n = "Summarise these notes.", 0
    while len(codec.encode(text, chat=True)) < tokens:
        n += 1
        text += f" Note {n}: the keeper logged the weather, the ships and the light."
    return text


def prefill_gap(url: str, answers: int = 2, tokens: int = 160) -> dict[str, float]:
    """`answers` answers decode; once each has 16 tokens a 2,000-token prompt arrives. The
    longest gap between two tokens of a running answer that spans any of its prefill,
    against the median gap of those answers before it arrived."""
    from meshshard.client import ask as stream

    prompt = long_prompt(LONG_PROMPT_TOKENS)
    stamps: list[list[float]] = [[] for _ in range(answers)]

    def decode(i: int) -> None:
        stream(url, PROMPT, max_tokens=tokens, temperature=0.0, seed=None, system=None,
               on_text=lambda _: stamps[i].append(time.perf_counter()))  # fmt: skip

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(answers)]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(s) >= 16 for s in stamps), 120, "the running answers", 0.05)
    t0 = time.perf_counter()
    long = stream(url, prompt, max_tokens=1, temperature=0.0, seed=None, system=None,
                  on_text=lambda _: None)  # fmt: skip
    t1 = time.perf_counter()
    for t in threads:
        t.join()
    # The first gap of each answer is left out: it follows its own prefill.
    before = [b - a for s in stamps for a, b in itertools.pairwise(s[1:]) if b < t0]
    during = [b - a for s in stamps for a, b in itertools.pairwise(s) if b > t0 and a < t1]
    usual, longest = statistics.median(before), max(during, default=float("nan"))
    return {
        "prompt_tokens": long["prompt_tokens"], "prefill_s": t1 - t0,
        "usual_gap_ms": usual * 1e3, "longest_gap_ms": longest * 1e3,
        "gap_ratio": longest / usual,
    }  # fmt: skip


@contextlib.contextmanager
def running(
    peers: int, memory: str, logs: Path, threads: int = 1, extra: tuple[str, ...] = ()
) -> Iterator[list[Peer]]:
    """`peers` plain-decoding peers offering `memory` each, once their chain has `peers`
    stages; yields them, the first (which answers) first."""
    base = 7600 + 10 * peers + 100 * threads
    procs = [
        Peer(
            f"bench-{i}", base + i, logs, "--memory", memory, "--threads", str(threads),
            "--speculate", "0", *extra, timings="lan",
        ).start()
        for i in range(peers)
    ]  # fmt: skip
    try:

        def ready() -> bool:
            # A peer that exited (its port in use, say) must not leave the answering to a
            # stranger on that port: a run once measured another run's leftover peers.
            for p in procs:
                if p.proc is not None and p.proc.poll() is not None:
                    raise SystemExit(f"{p.name} exited: {p.tail(3)}")
            s = procs[0].status()
            return bool(s and s.get("chain_ready") and len(s["plan"]["stages"]) == peers)

        wait_for(ready, 300, f"a {peers}-stage chain", 0.2)
        time.sleep(2)  # let start-up replans settle
        ask(procs[0].url, 4)  # warm-up
        yield procs
    finally:
        for p in procs:
            p.kill()


GAP_MEMORY = {2: "600MB", 3: "360MB"}


def gap_mesh(logs: Path, peers: int = 2) -> contextlib.AbstractContextManager[list[Peer]]:
    """The prefill gap's meshes, planned for 4,096 tokens of context: the benchmark's meshes
    have no KV room for the long prompt beside the running answers (the plan packs units up
    to a 2,048-token context). Two peers of 600 MB plan one wave; three of 360 MB plan three
    stages in two waves, where a prompt going through could merge the waves
    (docs/experiments/prompt-waves.txt)."""
    return running(peers, GAP_MEMORY[peers], logs, extra=("--context", "4096"))


def plan_words(peer: Peer) -> str:
    """The plan `peer` follows: its cuts, waves and head share."""
    plan = (peer.status() or {}).get("plan") or {}
    cuts = [(s.get("start"), s.get("end")) for s in plan.get("stages", [])]
    return f"plan {cuts}, {waves_words(plan)}, head share {plan.get('head_share')}"


def waves_words(plan: dict[str, Any]) -> str:
    """The plan's waves: its count, and its counts by answers decoding where they differ."""
    waves, by = plan.get("waves", 1), plan.get("waves_by") or []
    counts = f" (by answers decoding, 1, 2, ...: {', '.join(map(str, by))})" if by else ""
    return f"{waves} wave{'s' * (waves != 1)}{counts}"


def mesh(
    peers: int,
    tokens: int,
    repeats: int,
    logs: Path,
    threads: int,
    single: Single,
    ring_turns: bool = False,
) -> dict[str, Any]:
    """`ring_turns`: after each of the mesh's lone answers, the plan's shards as a ring of
    pipes with the head split at the plan's share (`floor`'s second ring), the peers idle
    meanwhile: the mesh against that floor in the same minute, where `floor` measures it
    minutes apart (runs 66-121 compared the two so, and the host's speed moved between)."""
    with running(peers, {2: "450MB", 3: "300MB"}[peers], logs, threads) as procs:
        url = procs[0].url
        plan = procs[0].status()["plan"]
        stages = plan["stages"]
        cuts = [s["start"] for s in stages] + [stages[-1]["end"]]
        head = head_rows(plan.get("head_share", 0.0)) if ring_turns else 0
        if head:
            from bench_layers import pipe_chain
        before = stage_counts(procs)
        one, beside, ring = [], [], []
        # What the hypervisor took while each kind of run ran (tools/steal.py).
        stolen = {k: Stolen() for k in ("beside", "one", "burst 1", "burst 8")}
        for _ in range(repeats):  # in turns (the peers idle while the single process runs)
            with stolen["beside"].watch():
                beside.append(single.answer(tokens)[0])
            with stolen["one"].watch():
                one.append(ask(url, tokens)["meshshard"])
            if head:
                ring.append(1000 / pipe_chain("fused", tokens, cuts, head)[1])
        after = stage_counts(procs)
        out = {
            "single_beside": statistics.median(beside),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in one),
            "ttft_s": statistics.median(r["ttft_s"] for r in one),
            # Where a lone answer's time goes: each stage's passes (wall, and the CPU
            # of the thread that ran them), per pass, prompts included.
            "one_passes": [per_pass(b, a) for b, a in zip(before, after, strict=True)],
            # The mesh's lone answers and the split ring's, round by round (tokens/s).
            "ring_turns": [(r["tokens_per_s"], x) for r, x in zip(one, ring, strict=False)],
            "cuts": cuts,
            "head_share": plan.get("head_share", 0.0),
            "waves": waves_words(plan),
            "wave_head": plan.get("wave_head", False),
        }
        out["aggregate_4"] = burst(url, 4, tokens)
        # One answer and 8 at once in turns, `repeats` pairs, the order alternating: the
        # host's speed moves by a quarter within minutes, and a pair shares its moment.
        ones, eights, ratios = [], [], []
        zero = [dict.fromkeys(c, 0.0) for c in stage_counts(procs)]
        rows = [dict(z) for z in zero]  # each stage's counters summed over the 8-answer bursts
        for i in range(repeats):
            for sessions in (1, 8) if i % 2 == 0 else (8, 1):
                before = stage_counts(procs)
                with stolen[f"burst {sessions}"].watch():
                    rate = burst(url, sessions, tokens)
                if sessions == 1:
                    ones.append(rate)
                    continue
                eights.append(rate)
                for got, b, a in zip(rows, before, stage_counts(procs), strict=True):
                    for key in got:
                        got[key] += a[key] - b[key]
            ratios.append(eights[-1] / ones[-1])
        out |= {
            "aggregate_1": statistics.median(ones),
            "aggregate_8": statistics.median(eights),
            "eight_vs_one": statistics.median(ratios),
            "eight_vs_one_pairs": ratios,
            # Rows per forward pass at each stage, over the 8 answers at once.
            "mean_batch_8": [
                per_pass(z, r)["rows_per_pass"] for z, r in zip(zero, rows, strict=True)
            ],
            "stolen": {k: str(v) for k, v in stolen.items()},
        }
        return out


def burst(url: str, sessions: int, tokens: int) -> float:
    """Aggregate tokens/s of `sessions` answers asked at once: all their tokens over the wall
    time from the first request to the last answer."""
    results: list[dict] = []
    callers = [
        threading.Thread(target=lambda: results.append(ask(url, tokens))) for _ in range(sessions)
    ]
    start = time.perf_counter()
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    took = time.perf_counter() - start
    return sum(r["usage"]["completion_tokens"] for r in results) / took


def floor(
    cuts: list[int], share: float, tokens: int, repeats: int, single: Single
) -> tuple[float, float, float]:
    """Tokens/s of the floor under any chain of three processes on this machine: the 3-peer
    plan's shards in a ring of pipes, nothing of the mesh (tools/bench_layers.py); of the
    same ring with the head split at the plan's `share`, as the mesh runs a lone answer; and
    of the single process measured in turns with them."""
    from bench_layers import pipe_chain

    head = head_rows(share)
    ms, split, beside = [], [], []
    for _ in range(repeats):
        beside.append(single.answer(tokens)[0])
        ms.append(pipe_chain("fused", tokens, cuts)[1])
        split.append(pipe_chain("fused", tokens, cuts, head)[1] if head else float("nan"))
    per_s = [1000 / statistics.median(m) for m in (ms, split)]
    return per_s[0], per_s[1], statistics.median(beside)


def per_pass(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """A stage's passes between two looks at its counters (as status shows them): rows
    (steps) per pass, and wall and CPU ms per pass (on whichever thread ran it)."""
    n = max(1, after["batches"] - before["batches"])
    return {
        "rows_per_pass": round((after["steps"] - before["steps"]) / n, 2),
        "pass_ms": round((after["forward_s"] - before["forward_s"]) * 1000 / n, 2),
        "cpu_ms": round((after["forward_cpu_s"] - before["forward_cpu_s"]) * 1000 / n, 2),
    }


def stage_counts(procs: list[Peer]) -> list[dict[str, float]]:
    """The counters of each peer's stage (steps, batches, passes' wall and CPU seconds), in
    chain order."""
    stages = [(s or {}).get("stage") or {} for s in (p.status() for p in procs)]
    ordered = sorted(stages, key=lambda st: st.get("units", [0])[0])
    keys = ("steps", "batches", "forward_s", "forward_cpu_s", "split_steps")
    return [{k: st.get(k, 0) for k in keys} for st in ordered]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logs", type=Path, help="keep the peers' logs in this folder")
    args = parser.parse_args()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    cores = torch_threads()
    # Each peer computes with one thread (--threads 1, as the demo runs them): the chain's
    # own cost shows against one process with as many; against one with every core, what a
    # user of one machine gives up. Peers of two threads show what one answer gets back.
    single = Single()
    local = {t: single.median(args.tokens, args.repeats, t) for t in sorted({1, cores})}
    local_rate = local[1][0]
    print(f"SmolLM2-135M float32, {args.tokens} new tokens, greedy; median of {args.repeats}; "
          f"ratios against the single process with 1 thread, each mesh's (and the rings') "
          f"against its runs in turns with it")  # fmt: skip
    head = ("setup", "tok/s 1 session", "ratio", "TTFT s", "agg 1", "agg 4", "agg 8", "8 vs 1")
    print("{:<22} {:>16} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7}".format(*head))
    groups = {}
    for t, (rate, ttft) in local.items():
        name = f"single, {t} thread{'s' * (t > 1)}"
        print(f"{name:<22} {rate:>16.1f} {rate / local_rate:>6.2f} {ttft:>7.3f}", flush=True)
        groups[name] = {"1 session": rate}
    batches: list[str] = []
    pairs: list[str] = []
    steals: list[str] = []
    passes: list[str] = []
    besides: list[str] = []
    turns: list[tuple[float, float]] = []
    kept = contextlib.nullcontext(str(args.logs)) if args.logs else None
    with kept or tempfile.TemporaryDirectory() as logs:
        for peers, threads in [(2, 1), (3, 1), (3, cores)] if cores > 1 else [(2, 1), (3, 1)]:
            alone = (peers, threads) == (3, 1)
            r = mesh(peers, args.tokens, args.repeats, Path(logs), threads, single, alone)
            name = f"{peers} peers, {threads} thread{'s' * (threads > 1)}"
            besides.append(f"{name} {r['single_beside']:.1f}")
            print(
                f"{name:<22} {r['tokens_per_s']:>16.1f} "
                f"{r['tokens_per_s'] / r['single_beside']:>6.2f} {r['ttft_s']:>7.3f} "
                f"{r['aggregate_1']:>7.1f} {r['aggregate_4']:>7.1f} {r['aggregate_8']:>7.1f} "
                f"{r['eight_vs_one']:>7.2f}",
                flush=True,
            )
            groups[name] = {f"{n} at once": r[f"aggregate_{n}"] for n in (1, 4, 8)}
            if alone:
                turns = r["ring_turns"]
                cuts, share = r["cuts"], r["head_share"]
                ring, split, ring_beside = floor(cuts, share, args.tokens, args.repeats, single)
                besides.append(f"the rings {ring_beside:.1f}")
                print(f"{'3 processes, pipes':<22} {ring:>16.1f} {ring / ring_beside:>6.2f}")
                print(f"{'pipes, head split':<22} {split:>16.1f} {split / ring_beside:>6.2f}")
            rows = ", ".join(f"{b:.2f}" for b in r["mean_batch_8"])
            head = ", the first stage scoring each wave's head" if r["wave_head"] else ""
            batches.append(f"{name} ({r['waves']}{head}): {rows}")
            pairs.append(f"{name} " + ", ".join(f"{x:.2f}" for x in r["eight_vs_one_pairs"]))
            st = r["stolen"]
            steals.append(
                f"{name}: one answer {st['one']} (the single process beside it "
                f"{st['beside']}), 1 at once {st['burst 1']}, 8 at once {st['burst 8']}"
            )
            passes.append(
                f"{name}: {1000 / r['tokens_per_s']:.1f} ms a token; passes "
                + " + ".join(f"{p['pass_ms']:.1f}" for p in r["one_passes"])
                + f" = {sum(p['pass_ms'] for p in r['one_passes']):.1f} ms (their CPU "
                + " + ".join(f"{p['cpu_ms']:.1f}" for p in r["one_passes"])
                + f" = {sum(p['cpu_ms'] for p in r['one_passes']):.1f})"
            )
        print("the single process in turns with each (tokens/s):", ", ".join(besides))
        if turns:
            print(
                "one answer through 3 peers, 1 thread, and the split ring after it, in turns "
                "(tokens/s, mesh/ring): "
                + ", ".join(f"{m:.1f}/{x:.1f}" for m, x in turns)
                + f"; the mesh {statistics.median(m / x for m, x in turns):.2f} of the ring "
                "(median of the rounds)"
            )
        print("rows per forward pass with 8 answers at once, stage by stage:", "; ".join(batches))
        print("8 vs 1, each pair (in turns, seconds apart):", "; ".join(pairs))
        print(
            "CPU time the hypervisor gave to others (steal, /proc/stat) while each ran:",
            "; ".join(steals),
        )
        print(f"one answer, stage by stage (single process, 1 thread: {1000 / local_rate:.1f} "
              f"ms a token; 3 processes in a ring of pipes, units cut at "
              f"{', '.join(map(str, cuts))}: {1000 / ring:.1f}, the head split at "
              f"{share:.2f}: {1000 / split:.1f}):",
              "; ".join(passes))  # fmt: skip
        print(
            "activation bytes per token per hop: 2304 (float32, hidden 576); "
            "token back to the origin: 4 bytes + framing"
        )
        gaps = {}
        for peers in (2, 3):
            with gap_mesh(Path(logs), peers) as procs:
                waves = waves_words((procs[0].status() or {}).get("plan") or {})
                gaps[peers] = (waves, prefill_gap(procs[0].url))
    for peers, (waves, gap) in gaps.items():
        print(
            f"{peers}-peer mesh ({GAP_MEMORY[peers].replace('MB', ' MB')} each, --context 4096, "
            f"{waves}), 2 answers decoding while a "
            f"{gap['prompt_tokens']}-token prompt is prefilled ({gap['prefill_s']:.1f} s): "
            f"longest gap {gap['longest_gap_ms']:.0f} ms, usual {gap['usual_gap_ms']:.0f} ms, "
            f"ratio {gap['gap_ratio']:.2f}"
        )
    plots.bars("chain", "SmolLM2-135M on loopback: aggregate tokens/s", "tokens/s", groups)


if __name__ == "__main__":
    main()
