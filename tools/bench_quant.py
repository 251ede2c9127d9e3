"""Speed and memory by dtype and quantization, one process and a 3-peer chain.

    python tools/bench_quant.py [--device cpu] [--tokens 64] [--json FILE] [--check]
                                [--cases float32,int8] [--speculate N]

For float32, bfloat16, int8 (float32 activations) and, on CUDA, int4 (bfloat16): one
process (`meshshard generate`: its tokens/s and peak resident memory) and a chain of three
real peers on loopback, each offering 40% of what the model needs so that the chain takes
all three (`meshshard ask`: decode tokens/s; the largest peer's peak resident set, which
counts the weights file's mapped pages, and its own anonymous memory after the answer,
which is what it holds: weights, caches and the runtime). Prints a table
and the ratios to float32; with --json, writes it and a plot named after it
(docs/benchmarks/STEM.png). --cases runs some of the cases (float32, the baseline, always);
--speculate N sets the chain's peers' drafting (their default otherwise: they verify drafts
in passes of several rows, which one process never runs; 0 decodes a token a pass).

--check compares the chain's greedy answer with the single-process float32 answer on the CPU:
the same tokens in float32, the same first tokens otherwise (reported, not judged: a lower
precision may take another path at a near-tie).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import plots  # noqa: E402
from support.procs import Peer, wait_for  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."
CONTEXT = 2048  # tokens of KV cache a plan reserves per unit


def cli(*args: str) -> dict[str, Any]:
    """Run `meshshard` and parse its JSON; with the child's peak resident memory in MB."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshshard", "--log-level", "error", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"meshshard {' '.join(args)} failed: {err.decode().strip()}")
    return json.loads(out) | {"peak_mb": usage.ru_maxrss / 1024}


def memory_mb(peer: Peer, field: str) -> float:
    """A line of /proc/PID/status in MB: VmHWM, the peak resident set (mapped pages of the
    weights file included, which the kernel may drop), or RssAnon, the process's own memory
    now (weights, caches, the runtime)."""
    assert peer.proc is not None
    for line in Path(f"/proc/{peer.proc.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ask(url: str, tokens: int) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens}
    body |= {"temperature": 0}
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=900) as resp:
        return dict(json.loads(resp.read()))


def chain(
    flags: list[str], offer: float, tokens: int, base: int, logs: Path, extra: list[str]
) -> dict[str, Any]:
    peers = [
        Peer(f"q-{c}", base + i, logs, "--memory", f"{offer:.0f}", "--threads", "1", *flags, *extra)
        for i, c in enumerate("abc")
    ]
    try:
        for p in peers:
            p.start()

        def ready() -> bool:
            s = peers[0].status()
            return bool(s and s.get("chain_ready") and len(s["plan"]["stages"]) == 3)

        try:
            wait_for(ready, 180, "a 3-stage chain", 0.5)
            time.sleep(2)
            ask(peers[0].url, 4)  # warm-up
            answer = ask(peers[0].url, tokens)
        except (AssertionError, OSError):
            for p in peers:
                print(f"--- {p.name}'s log, last lines:\n{p.tail(15)}", flush=True)
            raise
        return {
            "tokens_per_s": answer["meshshard"]["tokens_per_s"],
            "peak_mb": max(memory_mb(p, "VmHWM") for p in peers),
            "anon_mb": max(memory_mb(p, "RssAnon") for p in peers),
            "text": answer["choices"][0]["message"]["content"],
        }
    finally:
        for p in peers:
            p.kill()


def measure(
    flags: list[str], tokens: int, base: int, logs: Path, extra: list[str]
) -> dict[str, Any]:
    """One case: its sizes, one process's answer and speed, then a 3-peer chain's (its peers
    started with `extra` flags too)."""
    info = cli("model", "info", "--json", *flags)
    units = info["unit_weight_bytes"]
    kv = (4 if "float32" in flags else 2) * 2 * 3 * 64 * CONTEXT * info["layers"]
    one = cli("generate", PROMPT, "--chat", "--max-tokens", str(tokens), "--json", *flags)
    mesh = chain(flags, 0.4 * (info["weight_bytes"] + kv), tokens, base, logs, extra)
    return {
        "weight_mb": info["weight_bytes"] / 1e6,
        "layer_mb": units["L0"] / 1e6,
        "one_tokens_per_s": one["tokens_per_s"],
        "one_peak_mb": one["peak_mb"],
        "chain_tokens_per_s": mesh["tokens_per_s"],
        "chain_peak_mb": mesh["peak_mb"],
        "chain_anon_mb": mesh["anon_mb"],
        "text": one["text"],
        "chain_text": mesh["text"],
        "chain_same_as_one_process": mesh["text"] == one["text"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--cases", default="", help="comma-separated; default: all")
    parser.add_argument("--speculate", type=int, default=None)
    args = parser.parse_args()
    cases = {
        "float32": ["--dtype", "float32"],
        "bfloat16": ["--dtype", "bfloat16"],
        "int8": ["--dtype", "float32", "--quantize", "int8"],
    }
    if args.device.startswith("cuda"):
        cases["int8"] = ["--dtype", "bfloat16", "--quantize", "int8"]
        cases["int4"] = ["--dtype", "bfloat16", "--quantize", "int4"]
    if args.cases:
        wanted = {"float32", *args.cases.split(",")}
        if unknown := wanted - set(cases):
            parser.error(f"--cases: no case {', '.join(sorted(unknown))} on {args.device}")
        cases = {n: f for n, f in cases.items() if n in wanted}
    extra = [] if args.speculate is None else ["--speculate", str(args.speculate)]
    logs = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    results: dict[str, dict[str, Any]] = {}
    reference = cli("generate", PROMPT, "--chat", "--max-tokens", str(args.tokens), "--json",
                    "--device", "cpu", "--dtype", "float32")  # fmt: skip
    failed: dict[str, str] = {}
    for i, (name, flags) in enumerate(cases.items()):
        flags = [*flags, "--device", args.device]
        try:
            results[name] = measure(flags, args.tokens, 7200 + 10 * i, logs, extra)
        except (SystemExit, AssertionError, OSError) as e:
            # One case's failure is reported and the others still run: a GPU machine is lent
            # for minutes, and each case says something of its own.
            failed[name] = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            print(f"{name}: FAILED: {failed[name]}", flush=True)
            continue
        results[name]["same_tokens_as_cpu_float32"] = results[name]["text"] == reference["text"]
        print(f"{name}: done", flush=True)
    if "float32" not in results:
        print(f"no float32 baseline: {failed}")
        return 1
    base = results["float32"]
    print(f"\n{args.device}, {args.tokens} tokens, one process vs a 3-peer chain on loopback")
    head = ("case", "weights MB", "layer MB", "1 proc t/s", "ratio", "1 proc MB", "chain t/s",
            "ratio", "peer peak", "peer anon", "as fp32")  # fmt: skip
    print("  ".join(f"{h:>10}" for h in head))
    for name, r in results.items():
        row = (
            name,
            f"{r['weight_mb']:.0f}",
            f"{r['layer_mb']:.2f}",
            f"{r['one_tokens_per_s']:.1f}",
            f"{r['one_tokens_per_s'] / base['one_tokens_per_s']:.2f}",
            f"{r['one_peak_mb']:.0f}",
            f"{r['chain_tokens_per_s']:.1f}",
            f"{r['chain_tokens_per_s'] / base['chain_tokens_per_s']:.2f}",
            f"{r['chain_peak_mb']:.0f}",
            f"{r['chain_anon_mb']:.0f}",
            "yes" if r["same_tokens_as_cpu_float32"] else "no",
        )
        print("  ".join(f"{c:>10}" for c in row))
    if args.check:
        print(f"reference (cpu float32): {reference['text'][:100]!r}")
        for name, r in results.items():
            same = r["chain_same_as_one_process"]
            print(f"check {name}: the chain's answer is its one process's: {same}")
            print(f"  {name}: {r['text'][:100]!r}")
            if not same:
                one, two = r["text"], r["chain_text"]
                pairs = zip(one, two, strict=False)
                at = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(one), len(two)))
                print(f"  the chain's parts from it after {at} characters: ", end="")
                print(repr(r["chain_text"][at : at + 60]))
    if args.json:
        out = {"device": args.device, "tokens": args.tokens, "speculate": args.speculate}
        out |= {"results": results} | ({"failed": failed} if failed else {})
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        speeds = {
            n: {"one process": r["one_tokens_per_s"], "3-peer chain": r["chain_tokens_per_s"]}
            for n, r in results.items()
        }
        plots.bars(
            args.json.stem, f"tokens/s by dtype and quantization ({args.device})", "tokens/s",
            speeds,
        )  # fmt: skip
    ok = not failed and all(r["chain_same_as_one_process"] for r in results.values())
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    raise SystemExit(main())
