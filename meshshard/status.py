"""`meshshard status`: fetch a peer's status object and render it as a terminal table."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import click

from meshshard.errors import MeshShardError


def fetch_status(peer: str, token: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    url = peer.rstrip("/") + "/status"
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise MeshShardError(f"{peer}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MeshShardError(f"no peer answers at {peer}: {reason}") from None
    except ValueError:
        raise MeshShardError(f"{peer} did not answer with a status object") from None
    if not isinstance(data, dict):
        raise MeshShardError(f"{peer} did not answer with a status object")
    return data


def render_status(data: dict[str, Any]) -> str:
    epoch = data.get("epoch")
    lines = [
        click.style(f"peer {data.get('id')}", bold=True)
        + f"  model {data.get('model')}  coordinator {data.get('coordinator')}"
        + f"  epoch {f'{epoch[0]}/{epoch[1]}' if epoch else '-'}",
        "",
    ]
    rows = [("member", "state", "address", "memory", "shard", "profile", "inc")]
    for m in data.get("members", []):
        shard = m.get("shard")
        rows.append(
            (
                str(m["id"]),
                str(m["state"]),
                str(m["addr"]),
                f"{m['mem'] / 1e6:.0f} MB" if m.get("mem") is not None else "-",
                f"units {shard[0]}..{shard[1] - 1}" if shard else "-",
                {True: "measured", False: "estimate", None: "-"}[m.get("measured")],
                str(m["incarnation"]),
            )
        )
    lines.append(_table(rows, state_col=1))
    plan = data.get("plan")
    lines.append("")
    if plan and data.get("plan_error"):
        lines.append(click.style(f"cannot replan: {data['plan_error']}", fg="red"))
    if plan:
        chain = " -> ".join(f"{s['device']}[{s['start']}:{s['end']})" for s in plan["stages"])
        lines.append(f"plan ({plan['objective']}): {chain}")
        lines.append(
            f"predicted {plan['latency_ms']:.1f} ms/token, {plan['tokens_per_s']:.1f} tokens/s"
            f" (bottleneck {plan['bottleneck_ms']:.1f} ms)"
        )
    else:
        lines.append("no plan yet" + (f": {data['plan_error']}" if data.get("plan_error") else ""))
    history = data.get("history") or []
    if history:
        lines.append("")
        lines.append("epochs:")
        for p in history[-8:]:
            lines.append(f"  {p['epoch'][0]}/{p['epoch'][1]}  {p['reason']}")
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]], state_col: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    colours = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "blue"}
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
