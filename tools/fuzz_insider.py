"""Insider fuzzing: a key holder sends real peers sealed gossip with adversarial values.

    python tools/fuzz_insider.py [--seconds 120] [--seed 1] [--json FILE]

Three real peers on loopback (300 MB each, so the chain takes all three). For a fixed time the
harness builds Ping, Ack, PingReq, Nack and Sync messages from what the mesh really looks
like (its members, their addresses, a profile, the plan in force), replaces one to three
fields anywhere in them with a value from a catalogue (zero, values at and past the wire's
limits, incarnations and terms just inside and past what a peer believes, another member's
id or address, an unknown one, empty and oversized lists, NaN, infinity, wrong types), seals
each for a random peer as a key holder can, and POSTs it. Then it checks every peer still
runs, reads what they counted (refused gossip, failed loop rounds), waits for the mesh to
agree again, and compares its greedy answer with the single-process reference.

Target: 0 peers crashed, 0 failed loop rounds, the answer correct.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.procs import Peer, mesh_key, wait_for, wait_for_agreement, wait_for_chain  # noqa: E402
from support.reference import greedy_answer  # noqa: E402

from meshshard.mesh.sanity import FUTURE_SECONDS, incarnation_at, term_at  # noqa: E402
from meshshard.security import CONTROL, Keyring, Sealer  # noqa: E402
from meshshard.wire import MAX_COUNT, MAX_INCARNATION, MAX_TERM, PROTOCOL  # noqa: E402

BASE = 7200
PROMPT = "What is the capital of France?"
NEW = 12


def catalogue(rng: random.Random, mesh: dict[str, Any]) -> Any:
    """One adversarial value, of any type: the fuzzer puts values where they do not belong."""
    now = time.time()
    future = now + FUTURE_SECONDS
    ints = [0, 1, -1, 2**31 - 1, MAX_COUNT, 2**53 - 1, MAX_INCARNATION, 2**63 - 1, 2**63]
    ints += [2**64, MAX_TERM - 1, MAX_TERM, term_at(now), term_at(future), term_at(future) + 1]
    ints += [incarnation_at(now), incarnation_at(future) - 1, incarnation_at(future) + 10]
    floats = [0.0, -0.0, -1.0, 1e-300, 1e-3, 1.0, 1e6, 1e6 + 1, 1e15, 1e308,
              float("nan"), float("inf")]  # fmt: skip
    strings = ["", "x" * 256, "x" * 257, "ghost", "127.0.0.1:9", "no-port", "alive", "dead",
               "left", "suspect", *mesh["ids"], *mesh["addrs"]]  # fmt: skip
    kinds = [
        lambda: rng.choice(ints),
        lambda: rng.choice(floats),
        lambda: rng.choice(strings),
        lambda: rng.choice([True, False, None]),
        lambda: [],
        lambda: [rng.choice(ints)] * rng.choice([2, 5, 4097]),
        lambda: {},
        lambda: rng.randbytes(rng.randint(0, 32)),
    ]
    return rng.choice(kinds)()


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a nested message a value can be put."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += paths(child, (*prefix, i))
    return out


def at(body: Any, path: tuple[Any, ...]) -> Any:
    """The value at `path` in a nested message."""
    for key in path:
        body = body[key]
    return body


def put(body: Any, path: tuple[Any, ...], value: Any) -> None:
    at(body, path[:-1])[path[-1]] = value


def templates(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Well-formed messages as the mesh's own members send them."""
    members = [
        {"id": m["id"], "addr": m["addr"], "inc": m["incarnation"], "state": m["state"],
         "prio": m["priority"], "pv": 1, "ready": list(status["epoch"]), "drain": False}
        for m in status["members"]
    ]  # fmt: skip
    plan = status["plan"]
    record = {
        "epoch": plan["epoch"], "model": status["model"], "objective": plan["objective"],
        "stages": [[s["device"], s["start"], s["end"]] for s in plan["stages"]],
        "latency_ms": plan["latency_ms"], "bottleneck_ms": plan["bottleneck_ms"],
        "reason": "fuzz", "left_out": [],
    }  # fmt: skip
    units = plan["stages"][-1]["end"]
    sender = members[0]
    profile = {
        "id": sender["id"], "ver": 10**6, "model": status["model"], "mem": 3e8,
        "ms": [1.0] * units, "bms": [], "measured": True,
        "links": {m["id"]: [900.0, 0.5] for m in members[1:]}, "load": 0.0, "step": 1.0,
        "used": 1e8, "ovh": 0.1,
    }  # fmt: skip
    v = {"v": PROTOCOL}
    return [
        v | {"k": "ping", "sender": sender, "updates": members, "plan": record},
        v | {"k": "ack", "sender": sender, "updates": members, "plan": record},
        v
        | {
            "k": "ping-req",
            "sender": sender,
            "target": members[1]["id"],
            "addr": members[1]["addr"],
            "updates": members,
        },
        v | {"k": "nack", "sender": sender, "target": members[1]["id"]},
        v
        | {
            "k": "sync",
            "sender": sender,
            "members": members,
            "profiles": [profile],
            "plan": record,
        },
    ]


def send(sealer: Sealer, port: int, payload: bytes) -> int:
    addr = f"127.0.0.1:{port}"
    req = urllib.request.Request(
        f"http://{addr}/mesh/control", sealer.seal(CONTROL, payload, addr.encode())
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # no answer at all: a crashed peer shows in the process check


def chat(peer: Peer) -> str:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": NEW, "temperature": 0}
    req = urllib.request.Request(
        peer.url + "/v1/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return str(json.loads(resp.read())["choices"][0]["message"]["content"])
    except (OSError, ValueError, KeyError) as e:
        return f"no answer: {e}"


def arguments(doc: str) -> argparse.Namespace:
    """An insider fuzzer's command line (this one's and fuzz_stages.py's)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    return parser.parse_args()


def three_peers(base: int, logs: Path) -> list[Peer]:
    """Three real peers on loopback, 300 MB each: the chain takes all three."""
    return [
        Peer(f"peer-{c}", base + i, logs, "--memory", "300MB", "--threads", "1").start()
        for i, c in enumerate("abc")
    ]


def main() -> int:
    args = arguments(__doc__ or "")
    rng = random.Random(args.seed)
    reference = greedy_answer(PROMPT, NEW)
    logs = Path(tempfile.mkdtemp(prefix="fuzz-insider-"))
    peers = three_peers(BASE, logs)
    try:
        wait_for_chain(peers[0], 3)
        status = wait_for_agreement(peers, 120)
        mesh = {"ids": [m["id"] for m in status["members"]],
                "addrs": [m["addr"] for m in status["members"]]}  # fmt: skip
        sealer = Sealer(Keyring.load(mesh_key(logs)), "meshshard")
        answers: Counter[int] = Counter()
        tried = 0
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            body = rng.choice(templates(status))
            for _ in range(rng.randint(1, 3)):
                put(body, rng.choice(paths(body)), catalogue(rng, mesh))
            try:
                payload = bytes(cbor2.dumps(body))
            except (ValueError, TypeError, OverflowError):  # past what CBOR carries at all
                continue
            answers[send(sealer, rng.choice(peers).port, payload)] += 1
            tried += 1
            if tried % 500 == 0:  # the mesh moves on: mutate what it looks like now
                status = peers[0].status() or status
        crashed = [p.name for p in peers if p.proc is None or p.proc.poll() is not None]
        views = [p.status() for p in peers if p.name not in crashed]
        refused: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for v in views:
            if v is not None:
                refused.update(v["security"]["refused_gossip"])
                failed.update(v["security"]["loop_errors"])
        settled = time.monotonic()
        correct, settle_s = False, None
        if not crashed:
            try:
                wait_for_agreement(peers, 120)
                wait_for_chain(peers[0], 3)
                settle_s = round(time.monotonic() - settled, 1)
                wait_for(lambda: chat(peers[0]) == reference, 60, "a correct answer", 1.0)
                correct = True
            except AssertionError as e:
                print(f"the mesh did not recover: {e}")
        result = {
            "seconds": args.seconds, "seed": args.seed, "messages": tried,
            "http": {str(k): n for k, n in sorted(answers.items())},
            "refused_gossip": dict(refused), "loop_errors": dict(failed),
            "peers_crashed": crashed, "settle_s": settle_s,
            "answers_correctly": correct,
        }  # fmt: skip
    finally:
        for p in peers:
            p.kill()
    print(f"insider fuzz: {args.seconds:.0f} s, seed {args.seed}, 3 real peers")
    print(f"{'messages':<22} {tried}")
    for code, n in result["http"].items():
        print(f"{'  answered HTTP ' + code:<22} {n}")
    print(f"{'refused gossip':<22} {sum(refused.values())} {dict(refused)}")
    print(f"{'failed loop rounds':<22} {sum(failed.values())} {dict(failed)}")
    print(f"{'peers crashed':<22} {len(crashed)} (target 0)")
    print(f"{'mesh agreed again in':<22} {result['settle_s']} s")
    print(f"{'answers correctly':<22} {'yes' if correct else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if correct and not crashed and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
