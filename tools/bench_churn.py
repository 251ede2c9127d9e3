"""Failover: how long a caller waits for its next token when a stage goes mid-answer.

    python tools/bench_churn.py [--repeats 5] [--cases kill,stop,leave,small] [--json FILE]

Real peers on loopback with LAN timings. A greedy streamed answer (80 tokens) is asked from
a peer that is not the victim; after ten tokens the victim goes:

- kill:  SIGKILL of the stage at each position (0: the first stage, which is the
         coordinator; 1: the middle one; 2: the last), 4 peers of 300 MB (one spare);
- stop:  SIGSTOP at each position (a process frozen: no socket closes, nothing answers; it
         is killed once the answer is over), the silent loss SWIM's suspicion must catch;
- leave: SIGTERM of the middle stage (a graceful leave);
- small: 3 peers of 300 MB that hold the model only together; the middle stage is killed
         and the caller must get an error event, then a new request a 503, not a hang.

Per run: the seconds from the event to the next token the caller gets (for `small`, to the
error event, and the new request's time to its 503), whether the answer equals the
undisturbed single-process answer, and the false deaths: members other than the victim that
any peer's log declares dead; and whether the spare switched onto the units it had preloaded
(a warm standby) rather than loading. Prints min / median / max per case, writes the runs as
JSON and a plot (docs/benchmarks/churn.png).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import plots  # noqa: E402
from support.procs import Peer, wait_for  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."
TOKENS = 80
POSITIONS = {0: "first stage (coordinator)", 1: "middle stage", 2: "last stage"}
DEAD = re.compile(r"\] (\S+) (?:alive|suspect) -> dead")


def reference() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "meshshard", "--log-level", "error", "generate", PROMPT,
         "--chat", "--max-tokens", str(TOKENS), "--json"],
        capture_output=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return str(json.loads(out.stdout)["text"])


class Stream:
    """One streamed chat answer in a thread: arrival times of its pieces, its text, and an
    error event if one came."""

    def __init__(self, url: str) -> None:
        self.arrivals: list[float] = []
        self.text = ""
        self.error: tuple[float, str] | None = None
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS}
        body |= {"temperature": 0, "stream": True}
        self._req = urllib.request.Request(
            url + "/v1/chat/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        with urllib.request.urlopen(self._req, timeout=300) as resp:
            for raw in resp:
                if not raw.startswith(b"data: {"):
                    continue
                event = json.loads(raw[6:])
                if "error" in event:
                    self.error = (time.monotonic(), event["error"]["message"])
                    return
                piece = event["choices"][0]["delta"].get("content")
                if piece:
                    self.text += piece
                    self.arrivals.append(time.monotonic())

    def join(self) -> None:
        self._thread.join(300)


def refused_after(url: str) -> tuple[float, int, str]:
    """A new request's seconds to its answer, HTTP status and message."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return time.monotonic() - start, resp.status, ""
    except urllib.error.HTTPError as e:
        message = json.loads(e.read())["error"]["message"]
        return time.monotonic() - start, e.code, message


def false_deaths(peers: list[Peer], victim: str) -> int:
    """(observer, member) pairs where a peer's log declares a member other than the victim
    dead."""
    seen = set()
    for p in peers:
        text = p.log.read_text(errors="replace") if p.log.exists() else ""
        seen |= {(p.name, m) for m in DEAD.findall(text) if m != victim}
    return len(seen)


def once(
    case: str, position: int, repeat: int, base: int, logs: Path, expected: str
) -> dict[str, Any]:
    names = "abc" if case == "small" else "abcd"
    peers = [  # names of their own: each run's logs are its own
        Peer(f"{case}{position}r{repeat}-{c}", base + i, logs, "--memory", "300MB",
             "--threads", "1", timings="lan")
        for i, c in enumerate(names)
    ]  # fmt: skip
    try:
        for p in peers:
            p.start()

        def ready() -> bool:
            s = peers[0].status()
            return bool(s and s["chain_ready"] and len(s["plan"]["stages"]) == 3)

        wait_for(ready, 180, "a 3-stage chain", 0.2)
        time.sleep(2)  # profiles and link estimates settle
        status = peers[0].status()
        assert status is not None
        by_name = {p.name: p for p in peers}
        stages = [s["device"] for s in status["plan"]["stages"]]
        victim = by_name[stages[position]]
        spare = [p for p in peers if p.name not in stages]
        origin = spare[0] if spare else by_name[stages[0 if position else -1]]
        stream = Stream(origin.url)
        wait_for(lambda: len(stream.arrivals) >= 10 or stream.error, 120, "ten tokens", 0.005)
        at = time.monotonic()
        if case == "kill" or case == "small":
            victim.kill()
        elif case == "stop":
            victim.signal(signal.SIGSTOP)
        else:
            victim.stop(timeout=60)
        result: dict[str, Any] = {"case": case, "position": position, "victim": victim.name}
        if case == "small":
            stream.join()
            result["error_s"] = stream.error[0] - at if stream.error else None
            result["error"] = stream.error[1] if stream.error else ""
            took, code, message = refused_after(origin.url)
            result |= {"new_request_s": took, "new_request_status": code, "message": message}
        else:
            stream.join()
            after = [t for t in stream.arrivals if t > at]
            result["next_token_s"] = after[0] - at if after else None
            gaps = [b - a for a, b in zip(stream.arrivals, stream.arrivals[1:], strict=False)]
            result["median_gap_s"] = statistics.median(gaps) if gaps else None
            result["same_answer"] = stream.text == expected and stream.error is None
        standby = (spare[0].status() or {}).get("standby") if spare else None
        result["standby_used"] = standby["used"] if standby else None  # switched onto preloaded
        if case == "stop":
            victim.signal(signal.SIGCONT)
            victim.kill()
        time.sleep(0.5)
        result["false_deaths"] = false_deaths(peers, victim.name)
        return result
    finally:
        for p in peers:
            if p.proc is not None and p.proc.poll() is None:
                p.signal(signal.SIGCONT)
            p.kill()


def spread(xs: list[float]) -> str:
    if not xs:
        return f"{'-':>6} {'-':>7} {'-':>6}"
    return f"{min(xs):>6.2f} {statistics.median(xs):>7.2f} {max(xs):>6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default="kill,stop,leave,small")
    parser.add_argument("--logs", type=Path, help="keep the peers' logs here")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args()
    cases = args.cases.split(",")
    plan = [(c, p) for c in ("kill", "stop") if c in cases for p in POSITIONS]
    plan += [(c, 1) for c in ("leave", "small") if c in cases]
    expected = reference()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        port = 7300
        for i in range(args.repeats):
            for case, position in plan:
                run = once(case, position, i, port, logs, expected)
                port += 10
                run["repeat"] = i
                runs.append(run)
                print(json.dumps(run), flush=True)
    print(f"\n4 peers of 300 MB on loopback (3 for 'small'), lan timings, {args.repeats} runs each")
    print(f"{'case':<44} {'min':>6} {'median':>7} {'max':>6}  same  false deaths  standby")
    rows: list[tuple[str, list[float]]] = []
    for case, position in plan:
        mine = [r for r in runs if r["case"] == case and r["position"] == position]
        deaths = sum(r["false_deaths"] for r in mine)
        if case == "small":
            errors = [r["error_s"] for r in mine if r["error_s"] is not None]
            fresh = [r["new_request_s"] for r in mine]
            ok = sum(r["new_request_status"] == 503 for r in mine)
            name = "too small: kill -> error event (s)"
            print(f"{name:<44} {spread(errors)}  {len(errors)}/{len(mine)}  {deaths}")
            name = "too small: new request -> 503 (s)"
            print(f"{name:<44} {spread(fresh)}  {ok}/{len(mine)}")
            rows += [(name, fresh)]
            continue
        what = {"kill": "kill -9", "stop": "SIGSTOP", "leave": "graceful leave"}[case]
        name = f"{what}, {POSITIONS[position]} -> next token (s)"
        waits = [r["next_token_s"] for r in mine if r["next_token_s"] is not None]
        same = sum(bool(r["same_answer"]) for r in mine)
        preloaded = sum(bool(r.get("standby_used")) for r in mine)
        print(
            f"{name:<44} {spread(waits)}  {same}/{len(mine)}  {deaths:>12}  {preloaded}/{len(mine)}"
        )
        rows.append((name, waits))
    gaps = [r["median_gap_s"] for r in runs if r.get("median_gap_s")]
    print(f"{'normal gap between tokens (s)':<44} {spread(gaps)}")
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "runs": runs}, indent=1) + "\n")
    plots.spreads("churn", "Failover: event to the caller's next token (min, median, max)",
                  "seconds", rows)  # fmt: skip


if __name__ == "__main__":
    main()
