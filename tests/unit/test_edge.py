"""The network edge against the network as it is: bodies that arrive in many segments with
pauses, idle and slow connections, too many connections, and data-plane records."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from support.relay import Relay

from meshshard.api.guard import BrowserGuard, host_name
from meshshard.chain.channel import RECORD_BYTES, FrameCodec
from meshshard.edge.bodies import BodyError, read_body, request_body, response_body
from meshshard.edge.serve import ConnectionGate, serve
from meshshard.security import AuthError, Keyring, Sealer
from meshshard.types import Epoch
from meshshard.wire import DropFrame, KVFrame, TensorData, WireError

PORT, RELAY_PORT = 7581, 7582
BODY = bytes(range(256)) * 80  # 20,480 bytes


@asynccontextmanager
async def echo_server(
    gate: ConnectionGate | None = None, header_timeout: float = 5.0
) -> AsyncIterator[list[bytes]]:
    """POST /echo answers with the whole body it read; yields the bodies it read."""
    seen: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request_body(request, 1 << 20, 5.0)
        seen.append(body)
        return web.Response(body=body)

    app = web.Application()
    app.add_routes([web.post("/echo", echo)])
    runner = await serve(
        app, "127.0.0.1", PORT, "test", gate or ConnectionGate(64, 64), header_timeout
    )
    try:
        yield seen
    finally:
        await runner.cleanup()


async def test_bodies_split_into_segments_with_pauses_arrive_whole() -> None:
    async with echo_server() as seen:
        with Relay(PORT, RELAY_PORT, piece=1448, pause=0.05) as relay:
            async with aiohttp.ClientSession() as http:
                url = f"http://{relay.addr}/echo"
                async with http.post(url, data=BODY) as resp:
                    answer = await response_body(resp, 1 << 20, 10.0)

                async def chunked() -> AsyncIterator[bytes]:  # no Content-Length
                    for i in range(0, len(BODY), 5000):
                        yield BODY[i : i + 5000]
                        await asyncio.sleep(0.05)

                async with http.post(url, data=chunked()) as resp:
                    answer2 = await response_body(resp, 1 << 20, 10.0)
            assert relay.pieces > 2 * len(BODY) // 1448  # it really was cut, both ways
    assert seen == [BODY, BODY] and answer == BODY and answer2 == BODY


async def test_a_body_too_large_short_or_slow_is_refused_with_its_reason() -> None:
    reader = aiohttp.StreamReader(_Protocol(), 2**16, loop=asyncio.get_running_loop())
    with pytest.raises(BodyError, match="exceeds") as e:
        await read_body(reader, 2000, 1000, 1.0)
    assert e.value.status == 413
    reader.feed_data(b"x" * 500)
    reader.feed_eof()
    with pytest.raises(BodyError, match="ended after 500 of 800") as e:
        await read_body(reader, 800, 1000, 1.0)
    assert e.value.status == 400
    slow = aiohttp.StreamReader(_Protocol(), 2**16, loop=asyncio.get_running_loop())
    slow.feed_data(b"x" * 10)
    started = time.monotonic()
    with pytest.raises(BodyError, match="within") as e:
        await read_body(slow, 100, 1000, 0.2)
    assert e.value.status == 408 and time.monotonic() - started < 1.0
    endless = aiohttp.StreamReader(_Protocol(), 2**16, loop=asyncio.get_running_loop())
    endless.feed_data(b"x" * 1500)
    with pytest.raises(BodyError, match="exceeds 1000") as e:
        await read_body(endless, None, 1000, 1.0)  # no declared length: stops at the limit


class _Protocol:
    """What a StreamReader asks of its protocol (flow control only)."""

    _reading_paused = False
    connected = True

    def pause_reading(self, **_: object) -> None:
        pass

    def resume_reading(self, **_: object) -> None:
        pass


def _connect() -> socket.socket:
    s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
    s.settimeout(5)
    return s


def _closed(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_connections_over_the_caps_are_closed_unread() -> None:
    """... and quietly: closed before aiohttp's handler ran, each left a task failing on an
    assertion, logged as an error with its traceback for every refused connection."""
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    gate = ConnectionGate(per_host=3, total=5)
    async with echo_server(gate):
        held = [await asyncio.to_thread(_connect) for _ in range(3)]
        extra = await asyncio.to_thread(_connect)
        assert await asyncio.to_thread(_closed, extra, 2.0)
        assert gate.refused == 1 and gate.open == 3
        for s in held:
            s.close()
        await asyncio.sleep(0.2)
        assert gate.open == 0
        # Freed slots are taken again, and a request through one is served.
        url = f"http://127.0.0.1:{PORT}/echo"
        async with aiohttp.ClientSession() as http, http.post(url, data=b"hi") as resp:
            assert await resp.read() == b"hi"
    gc.collect()  # a task's unretrieved exception is reported as it is collected
    assert errors == []


async def test_idle_and_slow_header_connections_are_closed_after_the_timeout() -> None:
    async with echo_server(header_timeout=1.0):
        idle = await asyncio.to_thread(_connect)
        slow = await asyncio.to_thread(_connect)
        started = time.monotonic()
        slow.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        assert await asyncio.to_thread(_closed, idle, 4.0)
        assert await asyncio.to_thread(_closed, slow, 4.0)
        assert time.monotonic() - started < 4.0


def _codec(limit: int = 64 << 20) -> FrameCodec:
    return FrameCodec(Sealer(Keyring((bytes(32),)), "m"), max_frame_bytes=limit)


def _kv(length: int) -> KVFrame:
    tensor = TensorData("float32", (1, 3, length, 64), bytes(4 * 3 * length * 64))
    return KVFrame(Epoch(1, "a"), "s/1", 0, 0, tensor, tensor, "127.0.0.1:1", True)


def test_a_large_frame_travels_as_records_of_at_most_a_mebibyte() -> None:
    sender, receiver = _codec(), _codec()
    out = sender.channel(b"t" * 16, outbound=True)
    into = receiver.channel(b"t" * 16, outbound=False)
    frame = _kv(2048)  # 2 x 1.5 MiB of keys and values
    records = out.seal(frame)
    assert len(records) == 4 and all(len(r) <= receiver.max_message for r in records)
    assert [into.open(r) for r in records[:-1]] == [None] * 3
    assert into.open(records[-1]) == frame
    # Records are bound to their connection and direction: none opens elsewhere.
    back = receiver.channel(b"t" * 16, outbound=True)
    for channel in (receiver.channel(b"u" * 16, outbound=False), back):
        with pytest.raises(AuthError):
            channel.open(sender.channel(b"t" * 16, outbound=True).seal(DropFrame(*_ids()))[0])


def test_a_frame_past_the_limit_is_refused_as_its_records_arrive() -> None:
    sender, receiver = _codec(), _codec(limit=2 << 20)
    into = receiver.channel(b"t" * 16, outbound=False)
    out = sender.channel(b"t" * 16, outbound=True)
    records = out.seal(_kv(4096))
    assert len(records) == 7 and RECORD_BYTES == 1 << 20
    assert into.open(records[0]) is None and into.open(records[1]) is None
    with pytest.raises(WireError, match="exceeds"):
        into.open(records[2])  # refused before the rest is buffered
    # The rest of the refused frame is skipped, a record that does not open changes nothing,
    # and the next frame opens as usual.
    small = out.seal(DropFrame(*_ids()))
    assert [into.open(r) for r in records[3:5]] == [None, None]
    with pytest.raises(AuthError):
        into.open(b"garbage" * 20)
    assert into.open(small[0]) == DropFrame(*_ids())


def _ids() -> tuple[Epoch, str]:
    return Epoch(1, "a"), "s/2"


GUARD = BrowserGuard.for_api("127.0.0.1", ["mesh.example"])


@pytest.mark.parametrize(
    ("method", "host", "origin", "ctype", "refused"),
    [
        # Our own names and pages: served.
        ("GET", "127.0.0.1:8200", None, "", None),
        ("GET", "localhost:8200", None, "", None),
        ("GET", "[::1]:8200", None, "", None),
        ("GET", "MESH.example:8200", None, "", None),  # --api-allow-host, any case
        ("GET", "10.0.0.5:8200", None, "", None),  # the address the connection reached
        ("POST", "127.0.0.1:8200", "http://127.0.0.1:8200", "application/json", None),
        ("POST", "127.0.0.1:8200", None, "application/json", None),  # curl, the OpenAI client
        # DNS rebinding: a foreign name for our address, even to read.
        ("GET", "evil.example:8200", None, "", 403),
        ("GET", "127.0.0.1.evil.example", None, "", 403),
        ("GET", None, None, "", 400),
        # Another page (another site, another local port, a sandboxed frame) changes nothing.
        ("POST", "127.0.0.1:8200", "http://evil.example", "application/json", 403),
        ("POST", "127.0.0.1:8200", "http://127.0.0.1:9999", "application/json", 403),
        ("POST", "127.0.0.1:8200", "null", "application/json", 403),
        # What a no-cors fetch or a form can send is not JSON.
        ("POST", "127.0.0.1:8200", None, "text/plain", 415),
        ("POST", "127.0.0.1:8200", None, "application/x-www-form-urlencoded", 415),
    ],
)
def test_the_api_answers_only_its_own_names_and_pages(
    method: str, host: str | None, origin: str | None, ctype: str, refused: int | None
) -> None:
    got = GUARD.refusal(method, host, origin, ctype, "10.0.0.5")
    assert (got[0] if got else None) == refused


def test_an_api_on_all_addresses_answers_each_under_its_own_address() -> None:
    guard = BrowserGuard.for_api("0.0.0.0")
    assert guard.refusal("GET", "192.168.1.4:8200", None, "", "192.168.1.4") is None
    assert guard.refusal("GET", "0.0.0.0:8200", None, "", "192.168.1.4") is not None
    assert host_name("LOCALHOST.:8200") != "localhost"  # a trailing dot is another name
