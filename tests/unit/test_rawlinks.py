"""Raw links: decode steps by plain TCP, read in the socket's callback (real sockets on
loopback), and what they refuse."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import aiohttp
from support.dataplane import Unwatched, ignore
from test_lanes import ADDR, EPOCH, HIDDEN, ORIGIN, serving, step

from meshshard.chain.channel import FrameCodec, sealed_token
from meshshard.chain.links import Dispatch, Links, Refusals
from meshshard.chain.rawlinks import LENGTH, RawListener, listening
from meshshard.edge.serve import ConnectionGate
from meshshard.security import Keyring, Sealer, new_key
from meshshard.wire import DataFrame, DropFrame, ErrorCode, ErrorFrame, StepFrame, TokenFrame


def codec_of(key: bytes, **kw: int) -> FrameCodec:
    return FrameCodec(Sealer(Keyring((key,)), "m"), hidden_size=HIDDEN, me=ORIGIN, **kw)


@dataclass
class Received:
    """What arrived where: `now` in the reading callback, `later` by the dispatcher task."""

    now: list[DataFrame] = field(default_factory=list)
    later: list[DataFrame] = field(default_factory=list)
    order: list[DataFrame] = field(default_factory=list)  # both, as they were handed over
    more: list[bool] = field(default_factory=list)  # each offered now: did a step follow it


class Watch(Unwatched):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def raw_port(self, address: str) -> int:
        return self.port


@asynccontextmanager
async def raw_linked(
    codec: FrameCodec,
    accept_now: Callable[[DataFrame], bool] = lambda _: True,
    receiver: FrameCodec | None = None,
    back: Dispatch = ignore,
    port: int | None = None,
    hello_timeout: float = 5.0,
) -> AsyncIterator[tuple[Links, Received, Refusals, int]]:
    """Links to ADDR whose steps go by a raw link to a RawListener (reading with `receiver`'s
    limits; the listener's port, or `port` in the sender's view), the rest by a WebSocket;
    what the listener's `dispatch_now` takes (`accept_now`) and what its dispatcher gets are
    kept apart. Yields the links, what arrived, the listener's refusals, and its port."""
    got = Received()
    refusals = Refusals()
    gate = ConnectionGate(4, 8)

    def now(frame: DataFrame, more: bool) -> bool:
        got.more.append(more)
        if not accept_now(frame):
            return False
        got.now.append(frame)
        got.order.append(frame)
        return True

    async def later(frame: DataFrame) -> None:
        await asyncio.sleep(0.01)  # a dispatcher that waits (for a stage's room, say)
        got.later.append(frame)
        got.order.append(frame)

    reading = receiver or codec
    listener = RawListener(
        listening("127.0.0.1", 0), reading, lambda: ADDR, later, now, lambda _: None,
        refusals.note, gate.admit, gate.release, hello_timeout,
    )  # fmt: skip
    async with (
        serving(reading, later),
        aiohttp.ClientSession() as http,
        asyncio.TaskGroup() as tg,
    ):
        serve = tg.create_task(listener.run())
        links = Links(http, back, Watch(port or listener.port), tg, codec, Refusals(), 5.0)
        try:
            yield links, got, refusals, listener.port
        finally:
            await links.close()
            serve.cancel()


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.01)


async def test_decode_steps_go_by_the_raw_link_and_are_taken_where_they_are_read() -> None:
    """A decode step and a token go by the raw link, handed over in its reading callback; a
    prompt's rows and a drop go by the bulk WebSocket, to the dispatcher."""
    codec = codec_of(new_key())
    async with raw_linked(codec) as (links, got, refusals, _):
        await links.send(ADDR, step("decode", 1))
        await links.send(ADDR, TokenFrame(EPOCH, "decode", 1, (7,)))
        await links.send(ADDR, step("prompt", 40))
        await links.send(ADDR, DropFrame(EPOCH, "prompt"))
        await until(lambda: len(got.now) == 2 and len(got.later) == 2)
    assert [type(f).__name__ for f in got.now] == ["StepFrame", "TokenFrame"]
    assert [type(f).__name__ for f in got.later] == ["StepFrame", "DropFrame"]
    assert refusals.count == 0


async def test_send_now_writes_to_an_open_raw_link_and_declines_what_must_wait() -> None:
    codec = codec_of(new_key(), max_frame_bytes=1 << 16)
    async with raw_linked(codec) as (links, got, _, _):
        assert not links.send_now(ADDR, step("a", 1))  # no link open yet: send() opens it
        await links.send(ADDR, step("a", 1))
        assert links.send_now(ADDR, replace(step("a", 1), step=1))
        assert not links.send_now(ADDR, step("wide", 1, hidden=20_000))  # must be cut
        assert not links.send_now(ADDR, DropFrame(EPOCH, "a"))  # bulk: a WebSocket
        await until(lambda: len(got.now) == 2)
    assert [(f.session, f.step) for f in got.now if isinstance(f, StepFrame)] == [
        ("a", 0),
        ("a", 1),
    ]


async def test_frames_behind_one_the_callback_declined_keep_their_order() -> None:
    """Some frames are declined where they are read (a stage whose queue is full, say) and
    wait for the dispatcher; those read after one go behind it, though the callback would
    have taken them."""
    codec = codec_of(new_key())
    frames = [replace(step(f"s{i}", 1), step=i) for i in range(30)]
    declined = {"s3", "s12", "s21"}
    async with raw_linked(codec, accept_now=lambda f: f.session not in declined) as linked:
        links, got, _, _ = linked
        for frame in frames:
            await links.send(ADDR, frame)
        await until(lambda: len(got.order) == len(frames))
    assert [f.session for f in got.order] == [f.session for f in frames]
    assert declined <= {f.session for f in got.later}
    assert got.now[:3] == frames[:3]


async def test_a_raw_link_closed_under_its_frames_tells_their_origins() -> None:
    """The receiver refuses a decode step too wide for it and closes the raw link: the
    answers it carried hear "internal" and their origins feed them again."""
    codec = codec_of(new_key())
    strict = replace(codec, max_frame_bytes=1 << 16)
    told: list[ErrorFrame] = []

    async def back(frame: DataFrame) -> None:
        assert isinstance(frame, ErrorFrame)
        told.append(frame)

    async with raw_linked(codec, receiver=strict, back=back) as (links, got, refusals, _):
        await links.send(ADDR, replace(step("delivered", 1), attempt=2))
        await links.send(ADDR, replace(step("refused", 1, hidden=20_000), attempt=5))
        await until(lambda: len(told) == 2)
    assert [f.session for f in got.now] == ["delivered"]
    assert sorted((e.session, e.attempt, e.code) for e in told) == [
        ("delivered", 2, ErrorCode.INTERNAL),
        ("refused", 5, ErrorCode.INTERNAL),
    ]
    assert all("raw link" in e.message for e in told)
    assert refusals.count == 1


async def test_a_raw_port_that_does_not_open_leaves_the_websocket() -> None:
    """The peer's raw port does not answer (a firewall passes only its HTTP port): its steps
    go by WebSocket."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    codec = codec_of(new_key())
    async with raw_linked(codec, port=port) as (links, got, _, _):
        await links.send(ADDR, step("decode", 1))
        await until(lambda: len(got.later) == 1)
        assert not links.send_now(ADDR, step("decode", 1))
    assert got.now == []


async def stranger(port: int, *chunks: bytes) -> bytes:
    """Connect to the listener, write `chunks`, and read until it closes (b"" then). A reset
    is a close too: a socket closed with bytes unread, or reached by bytes after it closed,
    answers with one (seen once, a fresh-clone CI run's record too long after a hello)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        async with asyncio.timeout(3):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def record(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


async def test_the_listener_closes_on_whoever_does_not_open_a_raw_link_as_a_peer() -> None:
    codec = codec_of(new_key())

    def hello(sealer: Sealer = codec.sealer, addr: str = ADDR) -> bytes:
        return record(sealed_token(sealer, addr)[1])

    other_token, _ = sealed_token(codec.sealer, ADDR)
    elsewhere = codec.channel(other_token, outbound=True).seal(step("s", 1))[0]
    async with raw_linked(codec, hello_timeout=0.3) as (_, got, refusals, port):
        assert await stranger(port) == b""  # says nothing: closed at the hello timeout
        assert await stranger(port, hello(codec_of(new_key()).sealer)) == b""  # another key
        assert await stranger(port, hello(addr="10.0.0.9:7117")) == b""  # for another peer
        assert await stranger(port, LENGTH.pack(1 << 30)) == b""  # a hello too long to read
        assert await stranger(port, hello(), LENGTH.pack(1 << 30)) == b""  # a record too
        assert await stranger(port, hello(), record(b"not sealed")) == b""
        assert await stranger(port, hello(), record(elsewhere)) == b""  # another link's
    assert refusals.count == 7
    assert got.now == got.later == []


async def test_frames_split_across_reads_are_joined() -> None:
    """A frame's bytes cut anywhere (a link that delivers a byte at a time) arrive whole."""
    codec = codec_of(new_key())
    token, hello = sealed_token(codec.sealer, ADDR)
    channel = codec.channel(token, outbound=True)
    frames = [replace(step("cut", 1), step=i) for i in range(3)]
    data = record(hello) + b"".join(record(channel.seal(f)[0]) for f in frames)
    async with raw_linked(codec) as (_, got, refusals, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            if i % 97 == 0:
                await asyncio.sleep(0)
        await until(lambda: len(got.now) == 3)
        writer.close()
    assert [f.step for f in got.now if isinstance(f, StepFrame)] == [0, 1, 2]
    assert refusals.count == 0


async def test_frames_read_together_are_all_opened_before_any_is_taken() -> None:
    """Steps that one read brings (a wave's, written back to back) are offered with word that
    another step follows, so a stage queues them together instead of running the first alone
    while the rest are unread; the last step, and frames after it, go without."""
    codec = codec_of(new_key())
    token, hello = sealed_token(codec.sealer, ADDR)
    channel = codec.channel(token, outbound=True)
    frames = [
        step("a", 1),
        TokenFrame(EPOCH, "x", 1, (7,)),
        step("b", 1),
        step("c", 1),
        TokenFrame(EPOCH, "y", 1, (8,)),
    ]
    data = record(hello) + b"".join(record(channel.seal(f)[0]) for f in frames)
    async with raw_linked(codec) as (_, got, refusals, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)  # one write, one read on loopback
        await writer.drain()
        await until(lambda: len(got.now) == 5)
        writer.close()
    assert got.now == frames
    assert got.more == [True, True, True, False, False]
    assert refusals.count == 0
