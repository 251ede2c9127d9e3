"""A real 3-peer mesh on a network as it really is: every message between peers crosses a
relay that cuts it into segments with pauses; API bodies arrive in pieces 200 ms apart;
strangers open upgrades and hold connections; a key holder sends well-formed messages with
hostile values; callers ask for more than the mesh can hold. It keeps answering correctly."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from support.procs import (
    Peer,
    agreement,
    chain_of,
    mesh_key,
    settled,
    wait_for,
    wait_for_agreement,
    wait_for_chain,
)
from support.reference import greedy_answer
from support.relay import Relay
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshshard.chain.channel import CHANNEL_HEADER, open_request
from meshshard.mesh.discovery import SERVICE
from meshshard.mesh.sanity import FUTURE_SECONDS, incarnation_at, term_at
from meshshard.security import CONTROL, Keyring, Sealer
from meshshard.types import Epoch, Member, NodeId, PlanRecord, PlanStage, State
from meshshard.wire import MAX_TERM, PROTOCOL, Ping, encode

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France?"
NEW = 12
BASE = 7600  # peers on BASE.., their relays on BASE + 50.., API relays on BASE + 60..


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def relays() -> Iterator[list[Relay]]:
    """One relay in front of each peer: 1,448-byte pieces, 5 ms apart, both ways."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Relay(BASE + i, BASE + 50 + i, pause=0.005)) for i in range(3)]


@pytest.fixture(scope="module")
def mesh(logs: Path, relays: list[Relay]) -> Iterator[list[Peer]]:
    # Each peer announces its relay's address, so every message to it (gossip found by mDNS,
    # probes, pushes of several KB, activations, tokens) arrives in pieces.
    peers = [
        Peer(f"peer-{c}", BASE + i, logs, "--memory", "300MB", "--threads", "1",
             "--announce", relays[i].addr)
        for i, c in enumerate("abc")
    ]  # fmt: skip
    with chain_of(peers, 3):
        yield peers


@pytest.fixture(scope="module")
def reference() -> str:
    return greedy_answer(PROMPT, NEW)


def chat_body(pad: int = 0, **extra: Any) -> bytes:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": NEW, "temperature": 0}
    return json.dumps(body | extra).encode() + b" " * pad  # JSON may end in whitespace


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, dict[str, Any], Any]:
    """(status, headers, JSON answer) of a POST to the user API."""
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def answer(peer: Peer, url: str | None = None) -> str:
    status, _, data = post((url or peer.url) + "/v1/chat/completions", chat_body())
    assert status == 200, data
    return str(data["choices"][0]["message"]["content"])


def test_a_mesh_whose_every_message_arrives_in_pieces_forms_and_answers(
    mesh: list[Peer], relays: list[Relay], reference: str
) -> None:
    view = wait_for_agreement(mesh, 60)
    assert {m["addr"] for m in view["members"]} == {r.addr for r in relays}
    assert answer(mesh[0]) == reference
    # Syncs of several KB and activation frames (2.3 KB a token) did cross every relay, cut
    # into pieces. (How many depends on how long the mesh took to form.)
    assert all(r.cut >= 20 for r in relays), [(r.cut, r.pieces) for r in relays]


def test_api_bodies_in_pieces_with_pauses_are_read_whole(mesh: list[Peer], reference: str) -> None:
    api = BASE + 1000
    # A 20,000-byte body cut after each 1,448 bytes, 200 ms apart.
    with Relay(api, BASE + 60, piece=1448, pause=0.2) as relay:
        body = chat_body(pad=20_000 - len(chat_body()))
        assert len(body) == 20_000
        assert answer(mesh[0], f"http://{relay.addr}") == reference
    # A small request whose body comes in three segments 200 ms apart.
    with Relay(api, BASE + 61, piece=120, pause=0.2) as relay:
        assert answer(mesh[0], f"http://{relay.addr}") == reference


def upgrade(addr: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Send a WebSocket upgrade of /chain/ws; the status and headers of its answer."""
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    ws = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    ws["Sec-WebSocket-Key"] = base64.b64encode(b"0123456789abcdef").decode()
    try:
        conn.request("GET", "/chain/ws", headers=ws | headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_data_sockets_open_only_for_the_mesh_and_never_compressed(
    mesh: list[Peer], logs: Path
) -> None:
    addr = f"127.0.0.1:{BASE}"
    assert upgrade(addr, {})[0] == 401
    assert upgrade(addr, {CHANNEL_HEADER: base64.b64encode(b"x" * 80).decode()})[0] == 403
    # A stranger offering compression is refused before it matters; a peer is not offered it.
    _, sealed = open_request(Sealer(Keyring.load(mesh_key(logs)), "meshshard"), addr)
    deflate = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
    assert upgrade(addr, deflate)[0] == 401
    status, headers = upgrade(addr, sealed | deflate)
    assert status == 101 and "sec-websocket-extensions" not in headers


def test_idle_connections_beyond_the_caps_are_closed_and_the_mesh_answers(
    mesh: list[Peer], reference: str
) -> None:
    before = mesh[0].status()
    assert before is not None
    refused = before["security"]["refused_connections"]["peer"]
    held = [socket.create_connection(("127.0.0.1", BASE), timeout=5) for _ in range(40)]
    try:
        for s in held:
            s.settimeout(5)

        def closed(s: socket.socket) -> bool:
            try:
                return s.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                return True

        # Over the cap at once, the rest when the header timeout (3 s here) ends their idling.
        started = time.monotonic()
        assert all(closed(s) for s in held)
        assert time.monotonic() - started < 10
    finally:
        for s in held:
            s.close()
    after = mesh[0].status()
    assert after is not None and after["security"]["refused_connections"]["peer"] > refused
    wait_for(lambda: answer(mesh[0]) == reference, 60, "the mesh to answer again", 1.0)


async def spoof(fingerprint: str, count: int, hold: Callable[[], bool]) -> None:
    """Announce `count` bogus peers of this mesh (its fingerprint is public, in mDNS) at
    addresses where nothing answers, on loopback, while `hold()` says so."""
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=["127.0.0.1"])
    infos = [
        AsyncServiceInfo(
            SERVICE,
            f"bogus-{i}.{SERVICE}",
            addresses=[socket.inet_aton("127.0.0.1")],
            port=9100 + i,
            properties={
                "id": f"bogus-{i}",
                "v": str(PROTOCOL),
                "port": str(9100 + i),
                "fp": fingerprint,
            },
            server=f"bogus-{i}.local.",
        )
        for i in range(count)
    ]
    try:
        await asyncio.gather(*[await zc.async_register_service(info) for info in infos])
        end = time.monotonic() + 60
        while hold() and time.monotonic() < end:
            await asyncio.sleep(0.5)
    finally:
        await zc.async_unregister_all_services()
        await zc.async_close()


def test_spoofed_mdns_records_cost_a_bounded_number_of_tries(
    mesh: list[Peer], logs: Path, reference: str
) -> None:
    def introductions() -> list[dict[str, int]]:
        views = [p.status() for p in mesh]
        return [v["introductions"] for v in views if v is not None]

    before = [x["tried"] for x in introductions()]
    bogus = 8
    tried_all: list[bool] = []

    def hold() -> bool:
        # Until every peer has tried every bogus address and given each up.
        now = introductions()
        done = len(now) == 3 and all(
            x["tried"] - b >= 3 * bogus and x["pending"] == 0
            for x, b in zip(now, before, strict=True)
        )
        tried_all.append(done)
        return not done

    fingerprint = Keyring.load(mesh_key(logs)).fingerprint
    asyncio.run(spoof(fingerprint, bogus, hold))
    assert tried_all and tried_all[-1], introductions()
    time.sleep(3)  # records gone; nothing more is tried
    after = introductions()
    assert all(x["tried"] - b <= 3 * bogus + 3 for x, b in zip(after, before, strict=True)), after
    assert all(x["pending"] == 0 for x in after)
    wait_for_agreement(mesh, 30)
    assert answer(mesh[0]) == reference


def insider(logs: Path) -> Sealer:
    return Sealer(Keyring.load(mesh_key(logs)), "meshshard")


def gossip(sealer: Sealer, peer: Peer, payload: bytes) -> int:
    """POST a sealed control message to `peer`, as a key holder can; the HTTP status."""
    addr = f"127.0.0.1:{peer.port}"
    body = sealer.seal(CONTROL, payload, addr.encode())
    req = urllib.request.Request(f"http://{addr}/mesh/control", body)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def member_raw(peer: Peer, relay: Relay, **changes: Any) -> dict[str, Any]:
    raw = {"id": peer.name, "addr": relay.addr, "inc": 1, "state": "alive", "prio": 0, "pv": 0}
    return raw | {"ready": [0, ""], "drain": False} | changes


def raw_message(kind: str, sender: dict[str, Any], **fields: Any) -> bytes:
    return bytes(cbor2.dumps({"v": PROTOCOL, "k": kind, "sender": sender} | fields))


def test_hostile_values_from_a_key_holder_leave_the_mesh_answering(
    mesh: list[Peer], relays: list[Relay], logs: Path, reference: str
) -> None:
    sealer = insider(logs)
    status = mesh[0].status()
    assert status is not None
    epoch = status["epoch"]
    a, b, c = mesh
    me = member_raw(b, relays[1])
    profile = {"id": b.name, "ver": 10**6, "model": status["model"], "mem": 1e9,
               "ms": [1.0] * 32, "measured": True, "load": 0.0, "links": {}}  # fmt: skip
    # Out of range: refused at the wire (400), before anything is believed.
    for links in ({"peer-a": [0.0, 1.0]}, {"peer-a": [1e-300, 1.0]}):
        sync = raw_message("sync", me, members=[], profiles=[profile | {"links": links}])
        assert gossip(sealer, a, sync) == 400
    plan = {"model": status["model"], "objective": "latency", "stages": [["peer-a", 0, 32]],
            "latency_ms": 1.0, "bottleneck_ms": 1.0, "reason": "x"}  # fmt: skip
    for term in (2**63 - 1, MAX_TERM):
        ping = raw_message("ping", me, updates=[], plan=plan | {"epoch": [term, "peer-b"]})
        assert gossip(sealer, a, ping) == 400
    victim = member_raw(c, relays[2], state="dead", inc=2**63 - 1)
    assert gossip(sealer, a, raw_message("ping", me, updates=[victim], plan=None)) == 400
    # In range but not believable: refused and counted, the mesh unmoved.
    future = term_at(time.time() + FUTURE_SECONDS) + 1000
    ping = raw_message("ping", me, updates=[], plan=plan | {"epoch": [future, "peer-b"]})
    assert gossip(sealer, a, ping) == 200
    forged = Ping(
        Member(NodeId(b.name), relays[1].addr, 1, State.ALIVE),
        (),
        PlanRecord(Epoch(epoch[0] + 1, "peer-b"), "other-model", "latency",
                   (PlanStage(NodeId("peer-a"), 0, 32),), 1.0, 1.0),
    )  # fmt: skip
    assert gossip(sealer, a, encode(forged)) == 200
    someone_else = raw_message("sync", me, members=[], profiles=[profile | {"id": "peer-c"}])
    assert gossip(sealer, a, someone_else) == 200
    refused = a.status()
    assert refused is not None
    assert refused["security"]["refused_gossip"] == {"plan": 2, "profile": 1}
    assert refused["epoch"] == epoch
    # Believable lies about a member, which it outbids at once: declared dead at the largest
    # incarnation accepted, and given another address.
    latest = incarnation_at(time.time() + FUTURE_SECONDS) - 1000
    dead = member_raw(c, relays[2], state="dead", inc=latest)
    moved = member_raw(b, relays[1], addr="127.0.0.1:9", inc=latest)
    assert gossip(sealer, a, raw_message("ping", me, updates=[dead, moved], plan=None)) == 200
    # Peers may agree on the lie for a moment, before its subject's refutation reaches them.
    real = {r.addr for r in relays}

    def outbid() -> bool:
        view = agreement(mesh)
        return view is not None and {m["addr"] for m in view["members"]} == real

    wait_for(outbid, 60, "every member back at its own address", 0.1)
    wait_for_chain(a, 3)
    assert answer(a) == reference and answer(c) == reference
    for p in mesh:
        assert p.proc is not None and p.proc.poll() is None, p.tail()
        s = p.status()
        assert s is not None and s["security"]["loop_errors"] == {}, p.name


def test_requests_past_the_mesh_limits_get_clear_refusals_and_429(
    mesh: list[Peer], reference: str
) -> None:
    # Measured links may move units once; a session moved by a plan change is taken past a
    # stage's budget (it was admitted already), so the bound is judged under one plan.
    epoch = settled(mesh)["plan"]["epoch"]
    url = mesh[0].url + "/v1/chat/completions"
    started = time.monotonic()
    status, _, data = post(url, chat_body(seed=2**64))
    assert status == 400 and "seed" in data["error"]["message"]
    assert time.monotonic() - started < 5  # refused at once, not after the chain's timeout
    long = {"messages": [{"role": "user", "content": "word " * 3000}]}
    status, _, data = post(url, json.dumps(long).encode())
    assert status == 400 and "per answer" in data["error"]["message"]
    # Eight answers of up to 1,900 tokens at once: more KV cache than the stages offer.
    body = chat_body(max_tokens=1900, stream=True)
    views: list[dict[str, Any]] = []

    def ask(_: int) -> tuple[int, str | None]:
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.readline()  # admitted: its first event; then hang up
                views.extend(v for p in mesh if (v := p.status()) is not None)
                return resp.status, None
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Retry-After")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    codes = sorted(code for code, _ in results)
    assert 200 in codes and 429 in codes, results
    assert all(retry is not None and int(retry) > 0 for code, retry in results if code == 429)
    steady = [v["admission"] for v in views if v["epoch"] == epoch]
    assert steady, "the plan changed under every view"
    for admission in steady:  # no stage reserved more than its memory holds
        assert admission["kv_tokens"] is None or admission["kv_reserved"] <= admission["kv_tokens"]

    def released() -> bool:
        views = [p.status() for p in mesh]
        return all(v is not None and v["admission"]["kv_reserved"] == 0 for v in views)

    wait_for(released, 60, "the hung-up answers' reservations to be released", 0.5)
    assert answer(mesh[0]) == reference
    # The n choices of one request are admitted all or none: eight such in one get a 429,
    # and the choices admitted before the refusal give their reservations back.
    status, headers, data = post(url, chat_body(max_tokens=1900, n=8))
    assert status == 429 and int(headers["Retry-After"]) > 0, data
    wait_for(released, 60, "the refused request's admitted choices to be released", 0.5)
    status, _, data = post(url, chat_body(n=2))
    assert status == 200 and [c["message"]["content"] for c in data["choices"]] == [reference] * 2
