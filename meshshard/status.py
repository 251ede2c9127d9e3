"""`meshshard status`: fetch a peer's status object and render it as a terminal table."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import click


def render_status(data: dict[str, Any]) -> str:
    epoch = data.get("epoch")
    lines = [
        click.style(f"peer {data.get('id')}", bold=True)
        + f"  model {data.get('model')}  coordinator {data.get('coordinator')}"
        + f"  epoch {f'{epoch[0]}/{epoch[1]}' if epoch else '-'}",
        "",
    ]
    rows = [
        (
            "member",
            "state",
            "address",
            "device",
            "offers",
            "units",
            "step",
            "uses",
            "sessions",
            "profile",
        )
    ]
    for m in data.get("members", []):
        shard = m.get("shard")
        rows.append(
            (
                str(m["id"]) + (" *" if m["id"] == data.get("coordinator") else ""),
                str(m["state"]) + (" (draining)" if m.get("draining") else ""),
                str(m["addr"]),
                str(m.get("device") or "-"),
                _mb(m.get("mem")),
                f"{shard[0]}..{shard[1] - 1}" if shard else "-",
                f"{m['step_ms']:.1f} ms" if m.get("step_ms") else "-",
                _mb(m.get("used")),
                f"{m['sessions']:.0f}" if m.get("sessions") is not None else "-",
                {True: "measured", False: "estimate", None: "-"}[m.get("measured")]
                + _pace(m.get("pace"), m.get("batch_pace")),
            )
        )
    lines.append(_table(rows, state_col=1))
    plan = data.get("plan")
    lines.append("")
    if plan and data.get("plan_error"):
        lines.append(click.style(f"cannot replan: {data['plan_error']}", fg="red"))
    if plan:
        lines.append(
            f"plan ({plan['objective']}): {_chain(plan['stages'])}  [{plan.get('reason', '')}]"
        )
        for lost, stages in (plan.get("fallbacks") or {}).items():
            lines.append(f"  without {lost}: {_chain(stages)}")
        now = data.get("predicted_now") or plan
        lines.append(
            f"predicted {now['latency_ms']:.1f} ms/token, {now['tokens_per_s']:.1f} tokens/s"
            f" (bottleneck {now['bottleneck_ms']:.1f} ms)"
        )
        measured = data.get("measured") or {}
        if measured.get("latency_ms"):
            rate = measured.get("tokens_per_s") or 0
            lines.append(
                f"measured here {measured['latency_ms']:.1f} ms/token"
                + (f", {rate:.1f} tokens/s over the last 10 s" if rate else "")
            )
        spec = (data.get("origin") or {}).get("speculation") or {}
        if spec.get("drafted"):
            priced = (data.get("predicted_now") or {}).get("speculating") or {}
            lines.append(
                f"speculation: {spec['tokens_per_pass']:.2f} tokens per pass "
                f"({spec['kept']} of {spec['drafted']} drafted tokens kept)"
                + (
                    f"; predicted {priced['tokens_per_s']:.1f} tokens/s for one answer at that"
                    if priced
                    else ""
                )
            )
        for node, why in (data.get("idle") or {}).items():
            lines.append(click.style(f"left out {node}: {why}", fg="yellow"))
    else:
        lines.append("no plan yet" + (f": {data['plan_error']}" if data.get("plan_error") else ""))
    links = data.get("links") or []
    if links:
        lines.append("")
        link_rows = [("link", "rate", "rtt")] + [
            (f"{k['a']} -> {k['b']}", _rate(k["mbps"]), f"{k['rtt_ms']:.2f} ms") for k in links
        ]
        lines.append(_table(link_rows))
    events = data.get("events") or []
    if events:
        lines.append("")
        lines.append("recent events:")
        for e in events[-8:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(e["t"]))
            lines.append(f"  {stamp}  {e.get('kind', ''):<8} {e['text']}")
    return "\n".join(lines)


def _mb(x: float | None) -> str:
    return f"{x / 1e6:.0f} MB" if x else "-"


def _rate(mbps: float) -> str:
    return f"{mbps / 1000:.1f} Gbit/s" if mbps >= 1000 else f"{mbps:.0f} Mbit/s"


def _table(rows: Sequence[Sequence[str]], state_col: int | None = None) -> str:
    """Aligned columns, bold headers; `state_col` coloured by member state."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    colours = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "blue"}
    colours |= {f"{k} (draining)": v for k, v in colours.items()}
    out = []
    for n, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            text = cell.ljust(widths[i])
            if n and i == state_col:
                text = click.style(text, fg=colours.get(cell))
            elif n == 0:
                text = click.style(text, bold=True)
            cells.append(text)
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _chain(stages: list[dict[str, Any]]) -> str:
    return " -> ".join(f"{s['device']}[{s['start']}:{s['end']})" for s in stages)


def _pace(one: float | None, several: float | None) -> str:
    """How far its passes of one row, and of several, run from what its profile says, where
    they do."""
    shown = [
        f"x{pace:.2f}{kind}"
        for pace, kind in ((one, ""), (several, " batched"))
        if pace and round(pace, 2) != 1.0
    ]
    return f", {', '.join(shown)} now" if shown else ""
