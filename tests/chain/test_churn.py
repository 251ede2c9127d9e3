"""Answers survive a stage dying mid-generation: the origin replays its history on the new plan."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.procs import Peer, wait_for, wait_for_chain
from support.reference import greedy_answer

from meshshard.config import TEST_TIMINGS

pytestmark = pytest.mark.slow

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."
NEW = 64
LONG = 256


@pytest.fixture(scope="module")
def reference() -> str:
    return greedy_answer(PROMPT, NEW)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[Peer]]:
    # 300 MB each: a chain needs three of the four peers, so one can die and be replaced.
    started = [
        Peer(f"peer-{c}", 7800 + i, tmp_path, "--memory", "300MB", "--threads", "1").start()
        for i, c in enumerate("abcd")
    ]
    try:
        wait_for_chain(started[0], 3)
        yield started
    finally:
        for p in started:
            p.kill()


def stream(
    origin: Peer, seen: list[str], done: threading.Event, out: dict[str, object], tokens: int = NEW
) -> None:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    try:
        streamed(origin, body, seen, out)
    finally:
        done.set()


class Answer:
    """A greedy answer streaming from `origin` in a thread."""

    def __init__(self, origin: Peer, tokens: int = NEW) -> None:
        self.seen: list[str] = []
        self.out: dict[str, object] = {}
        self.done = threading.Event()
        args = (origin, self.seen, self.done, self.out, tokens)
        self.thread = threading.Thread(target=stream, args=args, daemon=True)
        self.thread.start()

    def wait_for_tokens(self, n: int, before: str) -> None:
        wait_for(lambda: len(self.seen) >= n or self.done.is_set(), 120, f"{n} tokens", 0.01)
        assert not self.done.is_set(), f"the answer finished before {before}"

    def finish(self) -> str:
        self.thread.join(300)
        assert "error" not in self.out, self.out
        return "".join(self.seen)


def streamed(origin: Peer, body: dict[str, Any], seen: list[str], out: dict[str, object]) -> None:
    """POST a streaming chat request; pieces go to `seen`, the error or epoch to `out`."""
    req = urllib.request.Request(
        origin.url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    out["error"] = event["error"]["message"]
                    break
                piece = event["choices"][0].get("delta", {}).get("content")
                if piece:
                    seen.append(piece)
                if "meshshard" in event:
                    out["epoch"] = event["meshshard"]["epoch"]
    except OSError as e:  # the origin itself died
        out["error"] = str(e)


@pytest.mark.parametrize(
    "victim_index", [1, -1, 0], ids=["middle stage", "last stage", "coordinator and first stage"]
)
def test_answer_survives_a_stage_killed_mid_generation(
    peers: list[Peer], reference: str, victim_index: int
) -> None:
    status = peers[0].status()
    assert status is not None
    plan = status["plan"]
    by_name = {p.name: p for p in peers}
    victim = by_name[plan["stages"][victim_index]["device"]]
    # The origin stays up: the coordinator (stage 0), or the last stage when stage 0 dies.
    origin = by_name[plan["stages"][0 if victim_index else -1]["device"]]
    assert origin is not victim
    answer = Answer(origin)
    answer.wait_for_tokens(10, "the kill")
    victim.kill()
    assert answer.finish() == reference
    assert answer.out["epoch"] != plan["epoch"], "the answer should have finished on a new plan"
    after = origin.status()
    assert after is not None
    assert victim.name not in {s["device"] for s in after["plan"]["stages"]}
    assert after["plan"]["epoch"][0] > plan["epoch"][0]
    assert after["origin"]["replays"] >= 1 and after["origin"]["sessions"] == 0
    if victim_index == 0:  # a new coordinator, elected from the survivors
        assert after["coordinator"] != victim.name
        assert after["plan"]["epoch"][1] == after["coordinator"]


def test_answer_survives_a_higher_priority_peer_joining(peers: list[Peer], tmp_path: Path) -> None:
    """A new device with a higher priority joins mid-answer: it becomes the coordinator, the
    plan changes under a new epoch, and the answer carries on unchanged. The answer is long
    (256 tokens, about 12 s) so that the newcomer starts and joins while it runs."""
    reference = greedy_answer(PROMPT, LONG)
    status = peers[0].status()
    assert status is not None
    plan = status["plan"]
    origin = next(p for p in peers if p.name == plan["stages"][-1]["device"])
    answer = Answer(origin, LONG)
    answer.wait_for_tokens(10, "the join")
    newcomer = Peer(
        "peer-z", 7810, tmp_path, "--memory", "2GB", "--threads", "1", "--priority", "5"
    ).start()
    peers.append(newcomer)  # the fixture kills it at the end
    assert answer.finish() == reference
    assert answer.out["epoch"] != plan["epoch"], "the join should have changed the plan mid-answer"
    after = origin.status()
    assert after is not None and after["coordinator"] == "peer-z"
    assert after["plan"]["epoch"][1] == "peer-z"
    # Every unit that moved had a live owner: caches were handed over, nothing was replayed.
    assert after["origin"]["handoffs"] >= 1 and after["origin"]["replays"] == 0


def test_graceful_leave_hands_over_without_replaying(peers: list[Peer]) -> None:
    """SIGTERM on the middle stage mid-answer: the mesh plans without it while it still
    serves, the session's caches move to the new owners, and nothing is fed twice."""
    status = peers[0].status()
    assert status is not None
    plan = status["plan"]
    by_name = {p.name: p for p in peers}
    leaver = by_name[plan["stages"][1]["device"]]
    origin = by_name[plan["stages"][0]["device"]]
    # Long enough to outlast the new chain's shard loads: the answer must still be running
    # when the mesh switches, or there is nothing to hand over.
    answer = Answer(origin, LONG)
    answer.wait_for_tokens(10, "the leave")
    assert leaver.stop(timeout=30) == 0
    assert answer.finish() == greedy_answer(PROMPT, LONG)
    assert "leaving without handing over" not in leaver.tail(200)
    after = origin.status()
    assert after is not None
    assert leaver.name not in {s["device"] for s in after["plan"]["stages"]}
    assert after["origin"]["handoffs"] >= 1 and after["origin"]["replays"] == 0


# Answers without near-ties (greedy_answer checks): batching must not be able to flip a token.
PROMPTS = [
    "Name three colours of the rainbow.",
    "What is the capital of Italy?",
    "Name the planets of the solar system.",
    "Count from one to five.",
]


def test_twenty_sessions_survive_a_kill_and_a_join(peers: list[Peer], tmp_path: Path) -> None:
    """20 answers at once while a stage is killed and a higher-priority peer joins (taking
    over as coordinator and first stage): every answer is right, and once they are done no
    peer holds a cache for any of them."""
    tokens = 48
    want = {p: greedy_answer(p, tokens) for p in PROMPTS}
    status = peers[0].status()
    assert status is not None
    plan = status["plan"]
    by_name = {p.name: p for p in peers}
    origin = by_name[plan["stages"][0]["device"]]
    victim = by_name[plan["stages"][1]["device"]]
    results: dict[int, str] = {}
    errors: dict[int, object] = {}
    progress: list[list[str]] = [[] for _ in range(20)]

    def one(i: int) -> None:
        out: dict[str, object] = {}
        body = {
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
        streamed(origin, body, progress[i], out)
        if "error" in out:
            errors[i] = out["error"]
        results[i] = "".join(progress[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(len(p) >= 3 for p in progress) >= 10, 120, "sessions under way", 0.02)
    victim.kill()
    newcomer = Peer(
        "peer-z", 7810, tmp_path, "--memory", "300MB", "--threads", "1", "--priority", "5"
    ).start()
    peers.append(newcomer)
    for t in threads:
        t.join(600)
    assert errors == {}
    for i, text in results.items():
        assert text == want[PROMPTS[i % len(PROMPTS)]], i
    assert len(results) == 20
    after = origin.status()
    assert after is not None and after["coordinator"] == "peer-z"
    live = [p for p in peers if p is not victim]

    def freed() -> bool:
        views = [p.status() for p in live]
        return all(
            v is not None
            and (v["stage"] is None or v["stage"]["sessions"] == 0)
            and v["kv"]["left_behind"] == 0
            for v in views
        )

    # Stages free a finished answer's caches at once; a cache left behind by a plan change
    # that no handoff claimed is freed when it expires (left_behind_keep), never later.
    keep = TEST_TIMINGS.left_behind_keep
    wait_for(freed, keep + 15, "every cache of the finished answers to be freed")


def test_sessions_of_a_dead_origin_are_freed(peers: list[Peer]) -> None:
    """An answer's origin dies mid-answer: its caches on the stages are freed soon after."""
    status = peers[0].status()
    assert status is not None
    in_chain = {s["device"] for s in status["plan"]["stages"]}
    origin = next(p for p in peers if p.name not in in_chain)
    Answer(origin, 512).wait_for_tokens(5, "its origin was killed")
    stages = [p for p in peers if p.name in in_chain]
    assert any(s["stage"]["sessions"] for s in (p.status() for p in stages) if s)
    origin.kill()

    def freed() -> bool:
        views = [p.status() for p in stages]
        return all(v is not None and v["stage"]["sessions"] == 0 for v in views)

    wait_for(freed, 20, "the dead origin's session to be freed")
