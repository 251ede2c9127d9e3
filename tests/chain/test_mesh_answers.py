"""A real 3-peer mesh on loopback answers exactly as the single-process reference does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.procs import Peer, wait_for, wait_for_chain
from support.reference import greedy_answer

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours of the rainbow.",
    "Count from one to five.",
]
NEW = 32


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Peer]]:
    logs = tmp_path_factory.mktemp("mesh")
    peers = [
        Peer(f"peer-{c}", 7500 + i, logs, "--memory", "300MB", "--threads", "1").start()
        for i, c in enumerate("abc")
    ]
    try:
        wait_for_chain(peers[0], 3)
        yield peers
        for p in peers:  # ordered shutdown: a clean exit, no traceback
            assert p.stop() == 0
            assert "Traceback" not in p.tail(400)
    finally:
        for p in peers:
            p.kill()


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    return {prompt: greedy_answer(prompt, NEW) for prompt in PROMPTS}


def chat(peer: Peer, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": NEW, "temperature": 0}
    req = urllib.request.Request(
        peer.url + "/v1/chat/completions",
        json.dumps(body | extra).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def test_the_plan_splits_the_model_over_three_peers(mesh: list[Peer]) -> None:
    status = mesh[0].status()
    assert status is not None
    stages = status["plan"]["stages"]
    assert stages[0]["device"] == status["coordinator"]
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 32
    for p in mesh:  # each peer holds only its own units
        s = p.status()
        assert s is not None and s["stage"] is not None
        assert s["stage"]["weight_bytes"] < 300e6


def test_greedy_answers_equal_the_single_process_reference(
    mesh: list[Peer], reference: dict[str, str]
) -> None:
    for i, prompt in enumerate(PROMPTS):
        answer = chat(mesh[i % 3], prompt)  # any peer can be the origin
        assert answer["choices"][0]["message"]["content"] == reference[prompt], prompt
        assert answer["meshshard"]["epoch"] == mesh[0].status()["plan"]["epoch"]  # type: ignore[index]


COPY = (
    "Repeat this sentence exactly: The old lighthouse on the hill has guided ships home "
    "through fog and storm for two hundred years."
)


def test_speculation_drafts_from_the_prompt_and_changes_no_token(mesh: list[Peer]) -> None:
    """A copy-heavy answer: drafted tokens are confirmed, and the answer is still exactly the
    single process's (which decodes one token at a time)."""
    origin = mesh[2]
    before = origin.status()["origin"]["speculation"]  # type: ignore[index]
    answer = chat(origin, COPY)
    assert answer["choices"][0]["message"]["content"] == greedy_answer(COPY, NEW)
    status = origin.status()
    assert status is not None
    after = status["origin"]["speculation"]
    kept, passes = after["kept"] - before["kept"], after["passes"] - before["passes"]
    assert kept > 0 and kept + passes >= answer["usage"]["completion_tokens"]
    assert after["tokens_per_pass"] > 1
    # The plan priced at these passes: their positions cost what the profiles' batch timings
    # say, and each yields tokens_per_pass tokens.
    priced = status["predicted_now"]["speculating"]
    assert priced["tokens_per_pass"] == pytest.approx(after["tokens_per_pass"], abs=0.01)
    assert priced["positions_per_pass"] >= priced["tokens_per_pass"]
    assert priced["tokens_per_s"] == pytest.approx(1000 / priced["latency_ms"], rel=0.01)


def test_eight_concurrent_sessions_get_their_own_answers(
    mesh: list[Peer], reference: dict[str, str]
) -> None:
    results: dict[int, str] = {}

    def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        results[i] = chat(mesh[i % 3], prompt)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 8
    for i, text in results.items():
        assert text == reference[PROMPTS[i % len(PROMPTS)]], i
    stage = mesh[1].status()["stage"]  # type: ignore[index]
    assert stage["batches"] < stage["steps"], "concurrent decode steps were never batched"
    # Status counts the decode passes by rows: some of several rows, every one of 1-16 rows.
    by_rows = {int(rows): n for rows, n in stage["passes"].items()}
    assert max(by_rows) > 1 and all(1 <= rows <= 16 and n > 0 for rows, n in by_rows.items())
    assert set(stage["pass_ms"]) == set(stage["passes"])

    def freed() -> bool:  # drops are sent in the background once an answer is complete
        return all(p.status()["stage"]["sessions"] == 0 for p in mesh)  # type: ignore[index]

    wait_for(freed, 10, "finished sessions to free their caches")
    # Every member's pace reaches the others by gossip (it stays 1 within 5% of its profile).
    paces = [m["pace"] for m in mesh[0].status()["members"]]  # type: ignore[index]
    assert len(paces) == 3 and all(0.2 < pace < 5 for pace in paces), paces


def test_ask_cli_from_every_peer(mesh: list[Peer], reference: dict[str, str]) -> None:
    prompt = PROMPTS[0]
    for p in mesh:
        out = subprocess.run(
            [sys.executable, "-m", "meshshard", "ask", prompt, "--max-tokens", str(NEW)]
            + ["--peer", p.url, "--json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["answer"] == reference[prompt]
        assert result["ttft_s"] > 0 and result["tokens_per_s"] > 0 and result["epoch"]


def streamed(client: Any, prompt: str, **extra: Any) -> Any:
    """A greedy answer streamed through the openai client."""
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=NEW, temperature=0,
        stream=True, **extra,
    )  # fmt: skip


def test_openai_client_streams(mesh: list[Peer], reference: dict[str, str]) -> None:
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=mesh[2].url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct").owned_by == "meshshard"
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")
    stream = streamed(client, PROMPTS[1])
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 3, "the answer should arrive in pieces"
    assert "".join(pieces) == reference[PROMPTS[1]]
    done = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
    )
    assert "Paris" in done.choices[0].text


def test_seeded_sampling_is_reproducible(mesh: list[Peer]) -> None:
    a = chat(mesh[0], PROMPTS[1], temperature=1.0, seed=7)["choices"][0]["message"]["content"]
    b = chat(mesh[1], PROMPTS[1], temperature=1.0, seed=7)["choices"][0]["message"]["content"]
    c = chat(mesh[1], PROMPTS[1], temperature=1.0, seed=8)["choices"][0]["message"]["content"]
    assert a == b and a != c
    # n choices at once: choice i samples with seed + i, as its own request would.
    both = chat(mesh[2], PROMPTS[1], temperature=1.0, seed=7, n=2)
    assert [ch["message"]["content"] for ch in both["choices"]] == [a, c]
    assert [ch["index"] for ch in both["choices"]] == [0, 1]


def test_n_choices_run_at_once_and_each_answers_whole(
    mesh: list[Peer], reference: dict[str, str]
) -> None:
    from openai import OpenAI

    got = chat(mesh[0], PROMPTS[0], n=3)
    assert [ch["message"]["content"] for ch in got["choices"]] == [reference[PROMPTS[0]]] * 3
    one = chat(mesh[0], PROMPTS[0])["usage"]
    assert got["usage"]["prompt_tokens"] == one["prompt_tokens"]  # the prompt counts once
    assert got["usage"]["completion_tokens"] == 3 * one["completion_tokens"]
    assert len(got["meshshard"]["choices"]) == 3
    client = OpenAI(base_url=mesh[1].url + "/v1", api_key="unused")
    stream = streamed(client, PROMPTS[3], n=2)
    pieces: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str | None] = {}
    for chunk in stream:
        for ch in chunk.choices:
            pieces[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished[ch.index] = ch.finish_reason
    assert pieces == {0: reference[PROMPTS[3]], 1: reference[PROMPTS[3]]}
    assert set(finished) == {0, 1}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n must"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}, "presence"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]}, "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "parts"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "parts"),
    ],
)
def test_bad_api_requests_get_a_400(mesh: list[Peer], body: dict[str, Any], message: str) -> None:
    req = urllib.request.Request(
        mesh[0].url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert message in json.loads(err.value.read())["error"]["message"]


def test_demo_brings_up_a_mesh_answers_and_shuts_down() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshshard", "--log-level", "warning", "demo", "--port", "7560"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Paris" in out.stdout
    assert "chain ready" in out.stdout and "tokens/s" in out.stdout
    assert "Traceback" not in out.stderr
    # A clean run takes its folder along, the mesh key with it.
    logs = re.search(r"\(logs in (\S+)\)", out.stdout)
    assert logs is not None and not Path(logs[1]).exists()
