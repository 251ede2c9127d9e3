"""An authenticated mesh of real peers: another key cannot join or inject, a captured message
cannot be replayed, a flood of garbage changes nothing, and the user API is local or tokened."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import torch
from support.dataplane import channel_to, origin_at
from support.procs import Peer, chain_of, mesh_key, wait_for, wait_for_agreement
from support.reference import greedy_answer

from meshshard.chain.channel import CHANNEL_HEADER, Channel, FrameCodec, open_request, sealed_token
from meshshard.chain.rawlinks import LENGTH
from meshshard.chain.tensors import to_wire
from meshshard.security import CONTROL, Keyring, Sealer, new_key, write_key_file
from meshshard.types import Epoch, Member, NodeId, State
from meshshard.wire import DataFrame, ErrorCode, Ping, Sampling, StepFrame, TokenFrame, encode

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France?"
NEW = 12
ORIGIN_PORT = 7499  # a WebSocket server of the test's own, playing an origin


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secure-mesh")


@pytest.fixture(scope="module")
def mesh(logs: Path) -> Iterator[list[Peer]]:
    peers = [
        Peer(f"peer-{c}", 7400 + i, logs, "--memory", "300MB", "--threads", "1",
             "--max-frame", "1MB")
        for i, c in enumerate("abc")
    ]  # fmt: skip
    with chain_of(peers, 3):
        yield peers


@pytest.fixture(scope="module")
def reference() -> str:
    return greedy_answer(PROMPT, NEW)


def chat(peer: Peer, token: str | None = None, prompt: str = PROMPT, new: int = NEW) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": new, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        peer.url + "/v1/chat/completions", json.dumps(body).encode(), headers
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return str(json.loads(resp.read())["choices"][0]["message"]["content"])


def security(peer: Peer) -> dict[str, int]:
    status = peer.status()
    assert status is not None
    return dict(status["security"])


def member_ids(peer: Peer) -> set[str]:
    """The members `peer` counts as alive."""
    status = peer.status()
    assert status is not None
    return {m["id"] for m in status["members"] if m["state"] == "alive"}


def first_stage(mesh: list[Peer]) -> tuple[Peer, Epoch]:
    status = mesh[0].status()
    assert status is not None
    plan = status["plan"]
    first = next(p for p in mesh if p.name == plan["stages"][0]["device"])
    return first, Epoch(plan["epoch"][0], plan["epoch"][1])


def step(epoch: Epoch, session: str) -> StepFrame:
    ids = to_wire(torch.tensor([1, 2, 3]))
    return StepFrame(epoch, session, 0, 0, ids, f"127.0.0.1:{ORIGIN_PORT}", True, Sampling(0, 1, 1))


async def send_records(
    addr: str, codec: FrameCodec, make: Callable[[Channel], list[bytes]], wait: float
) -> list[DataFrame]:
    """Open a socket to a stage's /chain/ws as a peer, send it the messages `make` builds,
    while playing an origin; returns the frames that came back within `wait` seconds."""
    got: list[DataFrame] = []
    async with origin_at(ORIGIN_PORT, codec, got.append), channel_to(addr, codec) as (ws, out):
        for data in make(out):
            await ws.send_bytes(data)
        await asyncio.sleep(wait)
    return got


def upgrade_status(addr: str, headers: dict[str, str]) -> int:
    """The answer to a WebSocket upgrade of /chain/ws with these headers (101: opened)."""
    key = {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    base = {"Upgrade": "websocket", "Connection": "Upgrade"} | key
    request = urllib.request.Request(f"http://{addr}/chain/ws", headers=base | headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


async def close_codes(addr: str, codec: FrameCodec, batches: list[list[bytes]]) -> list[int]:
    """Each batch of messages sent on a socket of its own: the code each socket closed with."""
    codes = []
    for batch in batches:
        async with channel_to(addr, codec) as (ws, _):
            try:
                for data in batch:
                    await ws.send_bytes(data)
                async with asyncio.timeout(10):
                    msg = await ws.receive()
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
                codes.append(ws.close_code)
            except ConnectionError:
                # The stage closed before all of it was sent (on a message's header, or on
                # a refused record), and its kernel reset the connection under our send:
                # closed, without a close frame.
                codes.append(aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
    return codes


def test_a_peer_with_another_key_cannot_join_or_inject(
    mesh: list[Peer], reference: str, tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    write_key_file(other, new_key())
    before = {p.name: security(p)["refused_messages"] for p in mesh}
    intruder = Peer(
        "intruder", 7410, tmp_path, "--memory", "2GB", "--secret-file", str(other),
        "--peer", mesh[0].addr, "--priority", "9",
    ).start()  # fmt: skip
    try:
        wait_for(lambda: intruder.status() is not None, 60, "the intruder to start")
        # It seeds itself to peer-a and would be coordinator by priority: give it time to try
        # (at once, then after 1, 2, 4 s: a seed that does not answer is backed off).
        tried = before["peer-a"] + 3
        wait_for(lambda: security(mesh[0])["refused_messages"] > tried, 30, "refusals")
        time.sleep(2)
        assert all(member_ids(p) == {"peer-a", "peer-b", "peer-c"} for p in mesh)
        assert member_ids(intruder) == {"intruder"}
        status = mesh[0].status()
        assert status is not None and status["coordinator"] != "intruder"
        # It cannot open a data-plane socket to a stage: its upgrade is refused unopened.
        first, _ = first_stage(mesh)
        theirs = Sealer(Keyring.load(other), "meshshard")
        refused = security(first)["refused_messages"]
        _, headers = open_request(theirs, first.addr)
        assert upgrade_status(first.addr, headers) == 403
        assert security(first)["refused_messages"] == refused + 1
        assert chat(mesh[0]) == reference
    finally:
        intruder.kill()


def test_a_replayed_frame_or_gossip_message_is_refused(mesh: list[Peer], logs: Path) -> None:
    keyring = Keyring.load(mesh_key(logs))
    codec = FrameCodec(Sealer(keyring, "meshshard"))
    first, epoch = first_stage(mesh)
    captured: list[bytes] = []

    def twice(out: Channel) -> list[bytes]:
        captured.extend(out.seal(step(epoch, "replay/1")))
        return captured * 2

    refused = security(first)["refused_frames"]
    got = asyncio.run(send_records(first.addr, codec, twice, 3.0))
    tokens = [f for f in got if isinstance(f, TokenFrame)]
    assert len(tokens) == 1, got  # the first copy ran through the chain; the replay did not
    assert security(first)["refused_frames"] == refused + 1
    # On another socket the captured record does not even open (bound to its connection).
    got = asyncio.run(send_records(first.addr, codec, lambda _: captured, 1.0))
    assert got == [] and security(first)["refused_frames"] == refused + 2
    # A gossip message: accepted once, refused when replayed, and refused by any peer but
    # the one it was sealed for.
    sealer = Sealer(keyring, "meshshard")
    me = Member(NodeId("peer-a"), mesh[0].addr, 0, State.ALIVE)  # an old record: no effect
    body = sealer.seal(CONTROL, encode(Ping(me, (), None)), mesh[1].addr.encode())
    url = f"http://{mesh[1].addr}/mesh/control"
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, body), timeout=10)
    assert err.value.code == 403 and b"replayed" in err.value.read()
    other = f"http://{mesh[2].addr}/mesh/control"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(other, body), timeout=10)
    assert err.value.code == 403 and b"recipient" in err.value.read()


def rss_mb(peer: Peer) -> float:
    assert peer.proc is not None
    for line in Path(f"/proc/{peer.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def strangers(host: str, port: int, messages: list[bytes]) -> int:
    """Each message on a connection of its own to a raw port; how many the peer closed."""
    closed = 0
    for data in messages:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(data)
            async with asyncio.timeout(10):
                closed += await reader.read() == b""
        except ConnectionError:
            closed += 1  # reset under our write: closed as well
        finally:
            writer.close()
    return closed


def test_a_flood_of_garbage_leaves_the_mesh_answering(
    mesh: list[Peer], reference: str, logs: Path
) -> None:
    rng = random.Random(7)
    first, epoch = first_stage(mesh)
    codec = FrameCodec(Sealer(Keyring.load(mesh_key(logs)), "meshshard"))
    # A stranger's upgrade is refused before a socket exists, with or without a header.
    refused = security(first)["refused_messages"]
    assert upgrade_status(first.addr, {}) == 401
    for _ in range(50):
        garbage_header = base64.b64encode(rng.randbytes(rng.randint(1, 200))).decode()
        assert upgrade_status(first.addr, {CHANNEL_HEADER: garbage_header}) == 403
    assert security(first)["refused_messages"] >= refused + 50
    # On a socket opened with the key, garbage or an unsealed record is refused, and the
    # socket closed (its sender's answers would otherwise wait for frames refused unseen).
    plain = FrameCodec(Sealer(None, "meshshard")).channel(b"", outbound=True)
    garbage = [rng.randbytes(rng.randint(1, 2048)) for _ in range(4500)]
    garbage += [r for i in range(500) for r in plain.seal(step(epoch, f"g/{i}"))]
    rng.shuffle(garbage)
    refused = security(first)["refused_frames"]
    rss = rss_mb(first)
    codes = asyncio.run(
        close_codes(first.addr, codec, [garbage[i : i + 10] for i in range(0, len(garbage), 10)])
    )
    assert len(codes) == 500 and aiohttp.WSCloseCode.POLICY_VIOLATION in codes
    assert set(codes) <= {
        aiohttp.WSCloseCode.POLICY_VIOLATION,
        aiohttp.WSCloseCode.ABNORMAL_CLOSURE,
    }
    wait_for(lambda: security(first)["refused_frames"] >= refused + 500, 60, "the flood")
    # A message over the record size (--max-frame 1MB) is refused unread: the socket closes.
    [code] = asyncio.run(close_codes(first.addr, codec, [[os.urandom(2 * 1024 * 1024)]]))
    # The stage closes with 1009; when it closes with our bytes still unread, its kernel
    # resets the connection and the close frame may be lost with it (1006).
    assert code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
    # The raw port: a stranger's bytes in place of a connection token, a token sealed for
    # another peer, a length past any limit: each connection closed before it carries a
    # frame, and counted.
    status = first.status()
    assert status is not None and status["raw_port"] > 0
    garbage = [rng.randbytes(rng.randint(1, 1024)) for _ in range(150)]
    garbage.append(sealed_token(codec.sealer, "10.9.9.9:7117")[1])
    raw = [LENGTH.pack(len(g)) + g for g in garbage] + [LENGTH.pack(1 << 31)] * 10
    refused = security(first)["refused_frames"]
    host = first.addr.rpartition(":")[0]
    assert asyncio.run(strangers(host, status["raw_port"], raw)) == len(raw)
    wait_for(lambda: security(first)["refused_frames"] >= refused + len(raw), 30, "the raw flood")
    # Garbage gossip: refused with 403, nothing learnt.
    url = f"http://{first.addr}/mesh/control"
    for _ in range(300):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, rng.randbytes(200)), timeout=10)
        assert err.value.code == 403
    assert rss_mb(first) - rss < 100
    assert all(member_ids(p) == {"peer-a", "peer-b", "peer-c"} for p in mesh)
    assert chat(first) == reference


def test_a_prompt_whose_activations_pass_the_frame_limit_crosses_in_pieces(
    mesh: list[Peer],
) -> None:
    """The peers take frames of at most 1 MB (--max-frame): an 800-token prompt runs at a
    stage in passes of hundreds of rows (its chunks join while the first runs), whose
    activations, 2,304 bytes a row, pass that. They cross as steps of rows that fit, and the
    answer is the single process's. Before, the frame was refused whole on every replay."""
    notes = " ".join(
        f"Note {n}: the keeper logged the weather, the ships and the light." for n in range(50)
    )
    prompt = f"Summarise these notes. {notes}"
    assert chat(mesh[0], prompt=prompt, new=8) == greedy_answer(prompt, 8)


def test_a_key_holders_hostile_frames_fail_no_step_but_their_own(
    mesh: list[Peer], reference: str, logs: Path
) -> None:
    """tools/fuzz_stages.py for a few seconds against the mesh (the last test on it: the
    fuzzer's sessions may hold its KV memory for minutes): every kind of data frame the wire
    takes, with adversarial values, refused or run, none failing inside a stage."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import fuzz_insider
    import fuzz_stages

    info = fuzz_stages.described(wait_for_agreement(mesh, 60))
    before = fuzz_stages.failures(logs)
    codec = FrameCodec(Sealer(Keyring.load(mesh_key(logs)), "meshshard"))
    sent, back = asyncio.run(fuzz_stages.fuzz(random.Random(11), mesh, codec, info, 8.0))
    assert sum(n for kind, n in sent.items() if kind != "refused at the wire") > 500
    assert back[ErrorCode.BAD_FRAME] > 0 and ErrorCode.INTERNAL not in back
    assert all(p.proc is not None and p.proc.poll() is None for p in mesh)
    assert fuzz_stages.failures(logs) == before
    answer = fuzz_insider.chat(mesh[0])
    assert answer == reference or "HTTP Error 429" in answer


def test_the_api_is_loopback_by_default_and_takes_a_token(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "meshshard", "up", "--insecure", "--api-bind", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "needs --api-token" in refused.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "meshshard", "up", "--interface", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "meshshard keygen" in missing.stderr
    peer = Peer("tokened", 7420, tmp_path, "--api-token", "s3cret", "--no-mdns").start()
    try:
        url = peer.url + "/status"
        wait_for(lambda: _http_code(url, None) == 401, 60, "the API to answer")
        assert _http_code(url, "wrong") == 401
        assert _http_code(url, "s3cret") == 200
        out = subprocess.run(
            [sys.executable, "-m", "meshshard", "status", "--peer", peer.url, "--json"]
            + ["--api-token", "s3cret"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and json.loads(out.stdout)["id"] == "tokened"
        # The peer port serves peers only: no API there, and gossip must be sealed.
        assert _http_code(f"http://{peer.addr}/status", None) == 404
        assert _post_code(f"http://{peer.addr}/mesh/control", b"\xa0") == 403
    finally:
        peer.kill()
    insecure = Peer("open", 7430, tmp_path, "--insecure", "--no-mdns").start()
    try:
        wait_for(lambda: "WITHOUT a mesh key" in insecure.tail(50), 60, "the insecure warning")
    finally:
        insecure.kill()


def _http_code(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5):
            return 200
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _post_code(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=5):
            return 200
    except urllib.error.HTTPError as e:
        return e.code
