"""Reproduce the EdgeShard paper's comparison with our planner and cost model.

    python tools/reproduce_paper.py [--out docs]

For Llama2-7B, 13B and 70B on the paper's 15-device testbed, and for source<->server
bandwidths of 1-50 Mbit/s between the server and every edge device (a cloud behind a slow
link) besides the 950 Mbit/s LAN: latency and throughput of solo (the
source alone), the best single device, even, memory-weighted, edgeshard-greedy and ours
(latency objective and throughput objective). Writes OUT/paper-reproduction.md (tables) and
OUT/paper-reproduction.png (plots), and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshshard.planner import Instance, InstanceError, Link, load_instance, solve  # noqa: E402
from meshshard.planner.baselines import baseline  # noqa: E402
from meshshard.planner.cost import Cost, Stage, evaluate  # noqa: E402

MODELS = ("7b", "13b", "70b")
BANDWIDTHS = (950.0, 50.0, 20.0, 10.0, 5.0, 1.0)
SERVER = "rtx3090-0"
# The methods this script has always compared (the paper's own baselines, on its own
# profile, are in tools/paper_profile.py).
METHODS = ("edge-solo", "best single", "even", "memory-weighted", "edgeshard-latency",
           "ours (latency)", "ours (throughput)")  # fmt: skip
PAPER = {"7b": (75.9, 52.5), "70b": (3086.0, 1.25)}  # EdgeShard's reported ms/token, tokens/s


def server_behind(inst: Instance, mbps: float) -> Instance:
    """The server reached by every edge device over a link of `mbps` (the cloud-edge case)."""
    link = Link(mbps, inst.default_link.ms)
    pairs = tuple((d.name, SERVER, link) for d in inst.devices if d.name != SERVER)
    return dataclasses.replace(inst, pairs=pairs)


def best_single(inst: Instance) -> Cost | None:
    """The fastest device that holds the whole model, as if the prompt started there."""
    costs = []
    for d in inst.devices:
        solo = dataclasses.replace(inst, source=d.name)
        try:
            costs.append(evaluate(solo, [Stage(d.name, 0, inst.n)]))
        except InstanceError:
            continue
    return min(costs, key=lambda c: c.latency_ms, default=None)


def measure(inst: Instance) -> dict[str, Cost | None]:
    out: dict[str, Cost | None] = {}
    for method in METHODS:
        try:
            if method == "best single":
                out[method] = best_single(inst)
            elif method.startswith("ours"):
                out[method] = solve(inst, method[6:-1]).cost  # type: ignore[arg-type]
            else:
                out[method] = baseline(inst, method)[1]
        except InstanceError:
            out[method] = None
    return out


def fmt(cost: Cost | None, latency: bool) -> str:
    if cost is None:
        return "OOM"
    return f"{cost.latency_ms:.1f}" if latency else f"{cost.tokens_per_s:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict[tuple[str, float], dict[str, Cost | None]] = {}
    for model in MODELS:
        base = load_instance(ROOT / "peers" / f"paper-llama2-{model}.json")
        for mbps in BANDWIDTHS:
            results[model, mbps] = measure(server_behind(base, mbps))

    lines = ["# EdgeShard comparison, reproduced with MeshShard's planner", ""]
    for latency in (True, False):
        what = "latency (ms/token, lower is better)" if latency else "throughput (tokens/s)"
        lines += [f"## {what}", ""]
        lines.append("| model | server link Mbit/s | " + " | ".join(METHODS) + " |")
        lines.append("|---" * (len(METHODS) + 2) + "|")
        for (model, mbps), row in results.items():
            cells = " | ".join(fmt(row[m], latency) for m in METHODS)
            lines.append(f"| Llama2-{model.upper()} | {mbps:g} | {cells} |")
        lines.append("")
    lines += ["## Ratios at 950 Mbit/s", ""]
    lines.append(
        "| model | latency: best single / ours | throughput: ours / best single | paper reported |"
    )
    lines.append("|---|---|---|---|")
    for model in MODELS:
        row = results[model, 950.0]
        single, lat, thr = row["best single"], row["ours (latency)"], row["ours (throughput)"]
        ratio_l = f"{single.latency_ms / lat.latency_ms:.2f}x" if single and lat else "only split"
        ratio_t = (
            f"{thr.tokens_per_s / single.tokens_per_s:.2f}x" if single and thr else "only split"
        )
        paper = PAPER.get(model)
        reported = f"{paper[0]} ms/token, {paper[1]} tokens/s" if paper else "-"
        lines.append(f"| Llama2-{model.upper()} | {ratio_l} | {ratio_t} | {reported} |")
    text = "\n".join(lines) + "\n"
    (args.out / "paper-reproduction.md").write_text(text)
    print(text)
    plot(results, args.out / "paper-reproduction.png")
    print(f"wrote {args.out / 'paper-reproduction.md'} and {args.out / 'paper-reproduction.png'}")


def plot(results: dict[tuple[str, float], dict[str, Cost | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MODELS), figsize=(5 * len(MODELS), 8))
    sweep = sorted(BANDWIDTHS)
    for col, model in enumerate(MODELS):
        for row, latency in enumerate((True, False)):
            ax = axes[row][col]
            for i, method in enumerate(METHODS):
                xs, ys = [], []
                for mbps in sweep:
                    cost = results[model, mbps][method]
                    if cost is not None:
                        xs.append(mbps)
                        ys.append(cost.latency_ms if latency else cost.tokens_per_s)
                if xs:
                    ax.plot(xs, ys, marker="o", label=method, color=f"C{i}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("edge-server bandwidth (Mbit/s)")
            ax.set_ylabel("ms/token" if latency else "tokens/s")
            ax.set_title(f"Llama2-{model.upper()} {'latency' if latency else 'throughput'}")
            ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=f"C{i}", marker="o") for i in range(len(METHODS))]
    fig.legend(handles, METHODS, loc="lower center", ncol=len(METHODS), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
