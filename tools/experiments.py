"""The planner against measurement, on the namespace testbeds (`tools/testbed.py`). Needs root.

    python tools/experiments.py prediction    # 1: predicted vs measured, each testbed, objective
    python tools/experiments.py compare       # 2: ours vs the baselines, measured, each testbed
    python tools/experiments.py sweep         # 3: edge-cloud, the cloud link at 1..100 Mbit/s
    python tools/experiments.py concurrency   # 4: lan-3, 1/4/8/16 sessions at once

Each prints a table and writes a PNG and a JSON of its results next to the docs
(docs/experiments/). Per-token latency is measured as (answer time - time to first token) /
(tokens - 1) of greedy 48-token answers, the median of three; throughput as the aggregate
tokens/s of concurrent answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from testbed import Testbed, api_url, down, up, wait_ready  # noqa: E402

OUT = ROOT / "docs" / "experiments"
PROMPT = "Write a short story about a lighthouse keeper."
TOKENS = 48


def client(sessions: int, tokens: int) -> dict[str, Any]:
    """Run inside a host's namespace: `sessions` answers at once; their timings."""
    results: list[dict[str, float]] = []

    def one(i: int) -> None:
        body = {
            "messages": [{"role": "user", "content": f"{PROMPT} ({i})"}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
        req = urllib.request.Request(
            api_url() + "/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        start = time.monotonic()
        arrivals = []
        with urllib.request.urlopen(req, timeout=900) as resp:
            for raw in resp:
                if b'"content"' in raw:
                    arrivals.append(time.monotonic())
        n = len(arrivals)
        per_token = (arrivals[-1] - arrivals[0]) / (n - 1) if n > 1 else float("nan")
        results.append({"tokens": n, "ttft_s": arrivals[0] - start, "per_token_s": per_token,
                        "start": start, "end": arrivals[-1] if arrivals else start})  # fmt: skip

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "sessions": sessions,
        "per_token_ms": statistics.median(r["per_token_s"] for r in results) * 1000,
        "tokens_per_s": sum(r["tokens"] for r in results) / span,
    }


def measure(tb: Testbed, sessions: int, repeats: int = 3) -> dict[str, Any]:
    """Median of `repeats` runs of the client in the first host's namespace."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            ["ip", "netns", "exec", tb.namespace(0), sys.executable, __file__, "_client",
             str(sessions), str(TOKENS)],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if out.returncode != 0:
            raise SystemExit(f"error: the client failed: {out.stderr.strip()[-500:]}")
        runs.append(json.loads(out.stdout))
    return {
        "sessions": sessions,
        "per_token_ms": statistics.median(r["per_token_ms"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
    }


def bring_up(tb: Testbed, objective: str) -> dict[str, Any]:
    up(tb, objective)
    status = wait_ready(tb)
    time.sleep(5)  # let links be measured and any replan settle
    status = wait_ready(tb)
    measure(tb, 1, repeats=1)  # warm-up
    return status


def predicted(status: dict[str, Any]) -> dict[str, float]:
    """The coordinator's prediction for the plan in force under the links as now measured
    (a plan's own record keeps the numbers it was made on)."""
    return dict(status.get("predicted_now") or status["plan"])


def describe(plan: dict[str, Any]) -> str:
    return " ".join(f"{s['device']}[{s['start']}:{s['end']})" for s in plan["stages"])


def prediction(testbeds: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in testbeds:
        tb = Testbed.load(ROOT / "peers" / f"{name}.toml")
        for objective in ("latency", "throughput"):
            try:
                status = bring_up(tb, objective)
                plan, now = status["plan"], predicted(status)
                stages = len(plan["stages"])
                one = measure(tb, 1)
                many = measure(tb, 2 * stages)
            finally:
                down(tb)
            rows.append({
                "testbed": name, "objective": objective, "plan": describe(plan),
                "predicted_ms": now["latency_ms"], "measured_ms": one["per_token_ms"],
                "predicted_tps": now["tokens_per_s"], "measured_tps": many["tokens_per_s"],
                "sessions": 2 * stages,
            })  # fmt: skip
            print_rows(rows[-1:], header=len(rows) == 1)
    return rows


def print_rows(rows: list[dict[str, Any]], header: bool) -> None:
    if header:
        print(f"{'testbed':<11} {'objective':<10} {'pred ms':>8} {'meas ms':>8} {'ratio':>6} "
              f"{'pred t/s':>8} {'meas t/s':>8} {'ratio':>6}  plan")  # fmt: skip
    for r in rows:
        print(f"{r['testbed']:<11} {r['objective']:<10} {r['predicted_ms']:>8.1f} "
              f"{r['measured_ms']:>8.1f} {r['measured_ms'] / r['predicted_ms']:>6.2f} "
              f"{r['predicted_tps']:>8.1f} {r['measured_tps']:>8.1f} "
              f"{r['measured_tps'] / r['predicted_tps']:>6.2f}  {r['plan']}")  # fmt: skip


METHODS = ("planner", "solo", "even", "memory-weighted", "edgeshard-greedy")


def apply(method: str) -> dict[str, Any]:
    """Run inside the coordinator's namespace: put `method`'s plan in force."""
    req = urllib.request.Request(
        api_url() + "/plan",
        json.dumps({"use": method}).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as e:
        return {"error": json.loads(e.read())["error"]["message"]}


def compare(testbeds: list[str]) -> list[dict[str, Any]]:
    rows = []
    print(f"{'testbed':<11} {'method':<17} {'pred ms':>8} {'meas ms':>8} {'meas t/s':>8}  plan")
    for name in testbeds:
        tb = Testbed.load(ROOT / "peers" / f"{name}.toml")
        try:
            bring_up(tb, "latency")
            for method in METHODS:
                out = subprocess.run(
                    ["ip", "netns", "exec", tb.namespace(0), sys.executable, __file__, "_apply",
                     method],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                plan = json.loads(out.stdout)
                if "error" in plan:
                    rows.append({"testbed": name, "method": method, "error": plan["error"]})
                    print(f"{name:<11} {method:<17} {'-':>8} {'-':>8} {'-':>8}  {plan['error']}")
                    continue
                status = wait_ready(tb)
                assert status["plan"]["epoch"] == plan["epoch"], (status["plan"], plan)
                now = predicted(status)
                one = measure(tb, 1)
                many = measure(tb, 2 * len(plan["stages"]), repeats=1)
                rows.append({
                    "testbed": name, "method": method, "plan": describe(plan),
                    "predicted_ms": now["latency_ms"], "measured_ms": one["per_token_ms"],
                    "measured_tps": many["tokens_per_s"],
                })  # fmt: skip
                r = rows[-1]
                print(f"{name:<11} {method:<17} {r['predicted_ms']:>8.1f} {r['measured_ms']:>8.1f} "
                      f"{r['measured_tps']:>8.1f}  {r['plan']}")  # fmt: skip
        finally:
            down(tb)
    return rows


def sweep(rates: list[float]) -> list[dict[str, Any]]:
    base = Testbed.load(ROOT / "peers" / "edge-cloud.toml")
    rows = []
    print(f"{'cloud Mbit/s':>12} {'uses cloud':>10} {'pred ms':>8} {'meas ms':>8}  plan")
    for mbps in rates:
        tb = base.with_rate("cloud", mbps)
        try:
            status = bring_up(tb, "latency")
            plan, now = status["plan"], predicted(status)
            one = measure(tb, 1)
        finally:
            down(tb)
        cloud = any(s["device"] == "cloud" for s in plan["stages"])
        rows.append({
            "mbps": mbps, "uses_cloud": cloud, "plan": describe(plan),
            "predicted_ms": now["latency_ms"], "measured_ms": one["per_token_ms"],
        })  # fmt: skip
        r = rows[-1]
        print(f"{mbps:>12g} {cloud!s:>10} {r['predicted_ms']:>8.1f} {r['measured_ms']:>8.1f}  "
              f"{r['plan']}")  # fmt: skip
    return rows


def concurrency(levels: list[int]) -> list[dict[str, Any]]:
    tb = Testbed.load(ROOT / "peers" / "lan-3.toml")
    rows = []
    try:
        plan = bring_up(tb, "latency")["plan"]
        print(f"lan-3, plan {describe(plan)}")
        print(f"{'sessions':>8} {'tokens/s':>9} {'vs one':>7} {'ms/token':>9}")
        for n in levels:
            m = measure(tb, n)
            rows.append(m)
            ratio = m["tokens_per_s"] / rows[0]["tokens_per_s"]
            print(f"{n:>8} {m['tokens_per_s']:>9.1f} {ratio:>7.2f} {m['per_token_ms']:>9.1f}")
    finally:
        down(tb)
    return rows


def plot(kind: str, rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if kind == "prediction":
        labels = [f"{r['testbed']}\n{r['objective']}" for r in rows]
        at = range(len(rows))
        ax.bar([x - 0.2 for x in at], [r["predicted_ms"] for r in rows], 0.4, label="predicted")
        ax.bar([x + 0.2 for x in at], [r["measured_ms"] for r in rows], 0.4, label="measured")
        ax.set_xticks(list(at), labels, fontsize=8)
        ax.set_ylabel("ms per token (one answer)")
    elif kind == "compare":
        ok = [r for r in rows if "error" not in r]
        beds = sorted({r["testbed"] for r in ok}, key=[r["testbed"] for r in ok].index)
        width = 0.8 / len(METHODS)
        for k, method in enumerate(METHODS):
            xs = [beds.index(r["testbed"]) + k * width for r in ok if r["method"] == method]
            ys = [r["measured_ms"] for r in ok if r["method"] == method]
            ax.bar(xs, ys, width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(beds))], beds)
        ax.set_ylabel("measured ms per token (one answer)")
    elif kind == "sweep":
        ms = [r["mbps"] for r in rows]
        ax.plot(ms, [r["predicted_ms"] for r in rows], "o--", label="predicted")
        ax.plot(ms, [r["measured_ms"] for r in rows], "o-", label="measured")
        for r in rows:
            ax.annotate("cloud" if r["uses_cloud"] else "edge only", (r["mbps"], r["measured_ms"]),
                        fontsize=7, xytext=(3, 5), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("cloud link, Mbit/s")
        ax.set_ylabel("ms per token")
    else:
        ax.plot([r["sessions"] for r in rows], [r["tokens_per_s"] for r in rows], "o-")
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("aggregate tokens/s")
    ax.legend() if kind != "concurrency" else None
    ax.set_title(f"{kind} (tools/experiments.py {kind})")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{kind}.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_client":
        print(json.dumps(client(int(sys.argv[2]), int(sys.argv[3]))))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "_apply":
        print(json.dumps(apply(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("prediction", "compare", "sweep", "concurrency"))
    parser.add_argument("--testbeds", default="lan-3,home-wifi,edge-cloud")
    args = parser.parse_args()
    if args.experiment == "prediction":
        rows = prediction(args.testbeds.split(","))
    elif args.experiment == "compare":
        rows = compare(args.testbeds.split(","))
    elif args.experiment == "sweep":
        rows = sweep([0.25, 0.5, 1, 5, 10, 50, 100])
    else:
        rows = concurrency([1, 4, 8, 16])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.experiment}.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {plot(args.experiment, rows)}")


if __name__ == "__main__":
    main()
