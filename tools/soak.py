"""No false deaths under load: a namespace testbed answering back to back, with plan changes,
for a fixed time; every member any peer's log declares dead is a false death (nothing is
killed).

    python tools/soak.py [peers/home-wifi.toml] [--minutes 30] [--json FILE]   # needs root

Load, all bounded by the time given: greedy answers of 64 tokens asked one after another,
from each host in turn (its own `meshshard ask`, inside its namespace); every 3 minutes the
coordinator is told to apply a plan that leaves one host out (the operator API's
`exclude`, each non-coordinator host in turn), then, 90 s later, the planner's own plan
again: shards reload, caches move and answers in flight switch chains. Prints the counts and
writes them (with every death line found) as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import testbed  # noqa: E402

DEAD = re.compile(r"\] (\S+) (?:alive|suspect) -> dead \(inc (\d+)\)")
SUSPECT = re.compile(r"\] (\S+) alive -> suspect")
STALL = re.compile(r"event loop stalled for ([\d.]+) s")
PROMPTS = [
    "Tell me a long story about a lighthouse keeper and a storm.",
    "Explain how a bicycle works.",
    "Repeat exactly: the quick brown fox jumps over the lazy dog, twice.",
]
CHANGE_EVERY = 180.0
RESTORE_AFTER = 90.0


def operator_plan(tb: testbed.Testbed, body: dict[str, Any]) -> str:
    """POST /plan on the coordinator's API (host 0: the testbed gives it the top priority)."""
    code = (
        "import json, sys, urllib.request\n"
        f"req = urllib.request.Request({testbed.api_url() + '/plan'!r}, sys.argv[1].encode(),"
        " {'Content-Type': 'application/json'})\n"
        "try:\n"
        "    print(urllib.request.urlopen(req, timeout=60).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode()[:200])\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", tb.namespace(0), sys.executable, "-c", code, json.dumps(body)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return (out.stdout or out.stderr).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("testbed", type=Path, nargs="?", default=ROOT / "peers/home-wifi.toml")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tb = testbed.Testbed.load(args.testbed)
    # Peers append to their logs: count only what this run writes.
    old = testbed.STATE / tb.name
    offsets = {h.name: (old / f"{h.name}.log").stat().st_size
               if (old / f"{h.name}.log").exists() else 0 for h in tb.hosts}  # fmt: skip
    state = testbed.up(tb)
    answers, failed, changes = 0, [], []
    try:
        testbed.wait_ready(tb)
        start = time.monotonic()
        end = start + args.minutes * 60
        next_change, restore_at, turn = start + CHANGE_EVERY, None, 0
        while time.monotonic() < end:
            now = time.monotonic()
            if restore_at is not None and now >= restore_at:
                changes.append(("planner", operator_plan(tb, {"use": "planner"})))
                restore_at = None
            elif now >= next_change:
                left = tb.hosts[1 + turn % (len(tb.hosts) - 1)].name
                changes.append((f"exclude {left}", operator_plan(tb, {"exclude": [left]})))
                turn, next_change, restore_at = turn + 1, now + CHANGE_EVERY, now + RESTORE_AFTER
            host = answers % len(tb.hosts)
            prompt = PROMPTS[answers % len(PROMPTS)]
            out = testbed.in_host(tb, host, "ask", "--json", "--max-tokens", "64", prompt,
                                  timeout=300)  # fmt: skip
            if out.returncode != 0:
                failed.append(f"{tb.hosts[host].name}: {out.stderr.strip()[-300:]}")
            answers += 1
        minutes = (time.monotonic() - start) / 60
    finally:
        logs = {}
        for h in tb.hosts:
            with open(state / f"{h.name}.log", "rb") as f:
                f.seek(offsets[h.name])
                logs[h.name] = f.read().decode(errors="replace")
        testbed.down(tb)
    deaths = [f"{host}: {line}" for host, text in logs.items()
              for line in text.splitlines() if DEAD.search(line)]  # fmt: skip
    suspicions = sum(len(SUSPECT.findall(text)) for text in logs.values())
    stalls = {host: [float(x) for x in STALL.findall(text)] for host, text in logs.items()}
    # One death, as each peer's log tells it: a member at one incarnation.
    distinct = {m.groups() for line in deaths if (m := DEAD.search(line))}
    result = {
        "testbed": tb.name,
        "minutes": round(minutes, 1),
        "answers": answers,
        "failed_answers": failed,
        "plan_changes": changes,
        "false_deaths": len(distinct),
        "death_lines": deaths,
        "suspicions": suspicions,
        "loop_stalls_s": stalls,  # each peer's event-loop stalls its own watch logged
    }
    print(f"{tb.name}: {minutes:.1f} min, {answers} answers ({len(failed)} failed), "
          f"{len(changes)} forced plan changes, {suspicions} suspicions, "
          f"{len(distinct)} false deaths ({len(deaths)} log lines), "
          f"{sum(map(len, stalls.values()))} event-loop stalls")  # fmt: skip
    for line in deaths:
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
