"""Speculative decoding through the chain: decode tokens/s with and without drafts, one run.

    python tools/bench_spec.py [--tokens 96] [--repeats 3] [--no-testbed]
    python tools/bench_spec.py --concurrent 8 [--tokens 96] [--repeats 3]

Three real `meshshard up` peers on loopback (300 MB each, one thread: a 3-stage chain), once
with `--speculate 8` (the default) and once with `--speculate 0`; then the edge-cloud
namespace testbed (peers/edge-cloud.toml, needs root) both ways. Copy-heavy prompts (repeat
or edit a given text) and free-form ones, greedy: the answers must be the same both ways.
Decode tokens/s after the first token as each answer reports it, median of the repeats per
prompt, then the median over a kind's prompts; beside it, what the mesh's status predicted for
one answer speculating at the passes it had seen (a speculating mesh per kind). Every run goes to
docs/benchmarks/speculation.json; the table and docs/benchmarks/speculation.png are made from it.

With --concurrent N: the loopback mesh only, N answers at once (a kind's prompts in turn),
where stages batch sessions and verify their drafts in shared passes; aggregate tokens/s (all
answers' tokens over the wall time from the first request to the last answer), every round
in docs/benchmarks/speculation-concurrent.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

import plots  # noqa: E402
import testbed  # noqa: E402
from support.procs import Peer, wait_for  # noqa: E402

PARAGRAPH = (
    "The old lighthouse stood on the northern cliff for two hundred years. Every night its "
    "keeper climbed the spiral stairs, trimmed the wick and wound the clockwork that turned "
    "the great lens, so that ships passing in fog and storm could find the harbour mouth."
)
PROMPTS = {
    "copy": [
        f"Repeat the following text exactly, word for word:\n\n{PARAGRAPH}",
        "Correct the one spelling mistake in this text and repeat the rest unchanged:\n\n"
        + PARAGRAPH.replace("harbour", "harbur"),
        f"Rewrite this text with every sentence on a line of its own:\n\n{PARAGRAPH}",
    ],
    "free": [
        "Tell me a long story about a lighthouse keeper and a storm.",
        "Explain how a bicycle works.",
        "Write a poem about autumn leaves.",
    ],
}
Ask = Callable[[str, int], dict[str, Any]]
Status = Callable[[], dict[str, Any] | None]


def runs(
    ask: Ask, status: Status, tokens: int, repeats: int, kinds: tuple[str, ...] = tuple(PROMPTS)
) -> list[dict[str, Any]]:
    """Every answer of every prompt of `kinds`, with the chain's passes and kept drafts during
    it, and what the status predicted for one answer at the passes so far once a kind's
    answers were in (a mesh of its own per kind: the status prices the origin's passes since
    it started; the warm-up is of the kind measured)."""
    ask(PROMPTS[kinds[0]][0], 4)  # warm-up
    out = []
    for kind in kinds:
        mine = []
        for p, prompt in enumerate(PROMPTS[kind]):
            for r in range(repeats):
                before = spec_stats(status())
                got = ask(prompt, tokens)
                after = spec_stats(status())
                mine.append(
                    {
                        "kind": kind,
                        "prompt": p,
                        "repeat": r,
                        "tokens_per_s": got["tokens_per_s"],
                        "ttft_s": got["ttft_s"],
                        "tokens": got["completion_tokens"],
                        "answer": got["answer"],
                        "passes": after["passes"] - before["passes"],
                        "kept": after["kept"] - before["kept"],
                    }
                )
        priced = ((status() or {}).get("predicted_now") or {}).get("speculating") or {}
        out += [r | {"predicted_tokens_per_s": priced.get("tokens_per_s")} for r in mine]
    return out


def concurrent(ask: Ask, status: Status, n: int, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Rounds of n answers at once per kind: aggregate tokens/s, and every answer."""
    ask(PROMPTS["free"][0], 4)  # warm-up
    out = []
    for kind, prompts in PROMPTS.items():
        for r in range(repeats):
            before = spec_stats(status())
            started = time.perf_counter()
            asked = [prompts[i % len(prompts)] for i in range(n)]
            with ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(lambda p: ask(p, tokens), asked))
            wall = time.perf_counter() - started
            after = spec_stats(status())
            total = sum(a["completion_tokens"] for a in answers)
            out.append(
                {
                    "kind": kind,
                    "repeat": r,
                    "tokens_per_s": total / wall,
                    "answers": [a["answer"] for a in answers],
                    "passes": after["passes"] - before["passes"],
                    "kept": after["kept"] - before["kept"],
                }
            )
    return out


def loopback(
    speculate: int, logs: Path, measure: Callable[[Ask, Status], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    procs = [
        Peer(f"spec-{i}", 7700 + i, logs, "--memory", "300MB", "--threads", "1",
             "--speculate", str(speculate)).start()
        for i in range(3)
    ]  # fmt: skip
    try:
        first = procs[0]

        def ready() -> bool:
            s = first.status()
            return bool(s and s.get("chain_ready") and len(s["plan"]["stages"]) == 3)

        wait_for(ready, 180, "a 3-stage chain", 0.2)
        time.sleep(2)  # start-up replans settle
        return measure(lambda p, n: http_ask(first.url, p, n), first.status)
    finally:
        for p in procs:
            p.kill()


def http_ask(url: str, prompt: str, tokens: int) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens}
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body | {"temperature": 0}).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=600) as resp:
        data = json.loads(resp.read())
    return {
        "answer": data["choices"][0]["message"]["content"],
        "completion_tokens": data["usage"]["completion_tokens"],
        **data["meshshard"],
    }


def spec_stats(status: dict[str, Any] | None) -> dict[str, Any]:
    assert status is not None, "a peer stopped answering"
    return dict(status["origin"]["speculation"])


def on_testbed(
    speculate: int, tokens: int, repeats: int, kinds: tuple[str, ...]
) -> list[dict[str, Any]]:
    tb = testbed.Testbed.load(ROOT / "peers" / "edge-cloud.toml")
    testbed.up(tb, extra=("--speculate", str(speculate)))
    try:
        testbed.wait_ready(tb)
        time.sleep(2)

        def ask(prompt: str, n: int) -> dict[str, Any]:
            out = testbed.in_host(tb, 0, "ask", "--json", "--max-tokens", str(n), prompt)
            if out.returncode != 0:
                raise SystemExit(f"ask failed: {out.stderr.strip()}")
            return dict(json.loads(out.stdout.strip().splitlines()[-1]))

        return runs(ask, lambda: testbed.status(tb, 0), tokens, repeats, kinds)
    finally:
        testbed.down(tb)


def summary(on: list[dict[str, Any]], off: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    def rate(rows: list[dict[str, Any]]) -> float:
        per_prompt = {}
        for p in sorted({r["prompt"] for r in rows if r["kind"] == kind}):
            mine = [r["tokens_per_s"] for r in rows if r["kind"] == kind and r["prompt"] == p]
            per_prompt[p] = statistics.median(mine)
        return statistics.median(per_prompt.values())

    mine = [r for r in on if r["kind"] == kind]
    passes, kept = sum(r["passes"] for r in mine), sum(r["kept"] for r in mine)
    same = all(
        a["answer"] == b["answer"] for a, b in zip(on, off, strict=True) if a["kind"] == kind
    )
    with_spec, without = rate(on), rate(off)
    predicted = next((r.get("predicted_tokens_per_s") for r in mine), None)
    return {
        "with": with_spec,
        "predicted": predicted,
        "without": without,
        "ratio": with_spec / without,
        "tokens_per_pass": (passes + kept) / passes if passes else 0.0,
        "same_answers": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-testbed", action="store_true", help="Loopback only (no root).")
    parser.add_argument("--concurrent", type=int, default=0, help="Answers at once (loopback).")
    args = parser.parse_args()
    if args.concurrent:
        return at_once(args.concurrent, args.tokens, args.repeats)
    setups: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def measure(*kinds: str) -> Callable[[Ask, Status], list[dict[str, Any]]]:
        return lambda ask, status: runs(ask, status, args.tokens, args.repeats, kinds)

    # Speculating, a mesh per kind: what the status predicts is priced at its passes so far.
    with tempfile.TemporaryDirectory() as logs:
        setups["3 peers, loopback"] = {
            "on": [r for kind in PROMPTS for r in loopback(8, Path(logs), measure(kind))],
            "off": loopback(0, Path(logs), measure(*PROMPTS)),
        }
    if not args.no_testbed:
        setups["edge-cloud testbed"] = {
            "on": [r for k in PROMPTS for r in on_testbed(8, args.tokens, args.repeats, (k,))],
            "off": on_testbed(0, args.tokens, args.repeats, tuple(PROMPTS)),
        }
    rows = {
        (setup, kind): summary(r["on"], r["off"], kind)
        for setup, r in setups.items()
        for kind in PROMPTS
    }
    out = ROOT / "docs" / "benchmarks" / "speculation.json"
    out.write_text(
        json.dumps(
            {
                "tokens": args.tokens,
                "repeats": args.repeats,
                "summary": [{"setup": s, "kind": k} | v for (s, k), v in rows.items()],
                "runs": setups,
            },
            indent=1,
        )
    )
    print(f"SmolLM2-135M float32, greedy, {args.tokens} new tokens; decode tokens/s, median of "
          f"{args.repeats} per prompt, median over {len(PROMPTS['copy'])} prompts")  # fmt: skip
    head = ("setup", "prompts", "speculate 8", "predicted", "meas/pred", "speculate 0", "ratio",
            "tok/pass", "same")  # fmt: skip
    print("{:<20} {:<8} {:>11} {:>9} {:>9} {:>11} {:>6} {:>8} {:>5}".format(*head))
    for (setup, kind), v in rows.items():
        pred = v["predicted"]
        priced = f"{pred:>9.1f} {v['with'] / pred:>9.2f}" if pred else f"{'-':>9} {'-':>9}"
        print(
            f"{setup:<20} {kind:<8} {v['with']:>11.1f} {priced} {v['without']:>11.1f} "
            f"{v['ratio']:>6.2f} {v['tokens_per_pass']:>8.2f} {v['same_answers']!s:>5}"
        )
    groups = {
        f"{setup}\n{kind}": {"speculate 8": v["with"], "speculate 0": v["without"]}
        for (setup, kind), v in rows.items()
    }
    plots.bars("speculation", "Speculative decoding: decode tokens/s", "tokens/s", groups)


def at_once(n: int, tokens: int, repeats: int) -> None:
    def measure(ask: Ask, status: Status) -> list[dict[str, Any]]:
        return concurrent(ask, status, n, tokens, repeats)

    with tempfile.TemporaryDirectory() as logs:
        on, off = loopback(8, Path(logs), measure), loopback(0, Path(logs), measure)
    rows = []
    for kind in PROMPTS:
        mine = [r for r in on if r["kind"] == kind]
        plain = [r for r in off if r["kind"] == kind]
        passes, kept = sum(r["passes"] for r in mine), sum(r["kept"] for r in mine)
        with_spec = statistics.median(r["tokens_per_s"] for r in mine)
        without = statistics.median(r["tokens_per_s"] for r in plain)
        same = all(a["answers"] == b["answers"] for a, b in zip(mine, plain, strict=True))
        rows.append(
            {
                "kind": kind,
                "with": with_spec,
                "without": without,
                "ratio": with_spec / without,
                "tokens_per_pass": (passes + kept) / passes if passes else 0.0,
                "same_answers": same,
            }
        )
    out = ROOT / "docs" / "benchmarks" / "speculation-concurrent.json"
    result = {"answers_at_once": n, "tokens": tokens, "repeats": repeats, "summary": rows}
    out.write_text(json.dumps(result | {"runs": {"on": on, "off": off}}, indent=1))
    print(f"{n} answers at once, 3 peers on loopback, {tokens} new tokens each; aggregate "
          f"tokens/s, median of {repeats} rounds")  # fmt: skip
    print("{:<8} {:>11} {:>11} {:>6} {:>8} {:>5}".format(
        "prompts", "speculate 8", "speculate 0", "ratio", "tok/pass", "same"))  # fmt: skip
    for v in rows:
        print(
            f"{v['kind']:<8} {v['with']:>11.1f} {v['without']:>11.1f} "
            f"{v['ratio']:>6.2f} {v['tokens_per_pass']:>8.2f} {v['same_answers']!s:>5}"
        )


if __name__ == "__main__":
    main()
