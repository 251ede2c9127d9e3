"""The testbed's transport delay: parsed from its variable, one way per end of a link."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections import Counter

import aiohttp
import pytest
from support.dataplane import Unwatched, ignore, origin_at

from meshshard.chain.channel import FrameCodec
from meshshard.chain.links import Links, Refusals
from meshshard.delays import ENV, Alarms, DelayedLinks, Delays, LateReading
from meshshard.security import Keyring, Sealer, new_key
from meshshard.types import Epoch
from meshshard.wire import DataFrame, DropFrame


def test_a_message_waits_both_ends_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "self=5, 10.0.0.2=20,10.0.0.3=0.5")
    d = Delays.from_env()
    assert d.to("10.0.0.2:7117") == pytest.approx(0.025)
    assert d.to("10.0.0.3") == pytest.approx(0.0055)
    # A host not listed is this peer itself (or a client on it): no link, no delay.
    assert d.to("10.0.0.9:1") == 0.0
    assert d.to("127.0.0.1:8117") == 0.0


def test_unset_means_no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert Delays.from_env().to("10.0.0.2:7117") == 0.0


async def test_a_delayed_link_holds_frames_not_their_sender() -> None:
    """On a link with latency the sender is free once a frame is on its way: a stage must
    not wait out the delay before its next batch. Frames still arrive late and in order."""
    codec = FrameCodec(Sealer(Keyring((new_key(),)), "m"))
    arrived: list[tuple[str, float]] = []

    def take(frame: DataFrame) -> None:
        assert isinstance(frame, DropFrame)
        arrived.append((frame.session, time.monotonic()))

    async with (
        origin_at(7597, codec, take) as addr,
        aiohttp.ClientSession() as http,
        asyncio.TaskGroup() as tg,
    ):
        delays = Delays(5, {"127.0.0.1": 95})
        alarms = Alarms()
        links = DelayedLinks(
            Links(http, ignore, Unwatched(), tg, codec, Refusals(), 5.0), delays, tg, alarms
        )
        sent = time.monotonic()
        for i in range(3):
            await links.send(addr, DropFrame(Epoch(1, "a"), f"s{i}"))
        assert time.monotonic() - sent < 0.05
        while len(arrived) < 3 and time.monotonic() - sent < 5:
            await asyncio.sleep(0.01)
        await links.close()
        alarms.close()
    assert [s for s, _ in arrived] == ["s0", "s1", "s2"]
    assert all(t - sent >= 0.1 for _, t in arrived)


class Recorded:
    """Inner links that record how each frame went out: `raw` links take frames at once
    (`send_now`) unless `busy`; the sender takes 10 ms a frame."""

    def __init__(self) -> None:
        self.out: list[tuple[str, str, float]] = []
        self.raw_open = self.busy = False
        self.sent_bytes: Counter[str] = Counter()

    def raw(self, addr: str, frame: DataFrame) -> bool:
        return self.raw_open

    async def send(self, addr: str, frame: DataFrame) -> None:
        assert isinstance(frame, DropFrame)
        await asyncio.sleep(0.01)
        self.out.append(("sender", frame.session, time.monotonic()))

    def send_now(self, addr: str, frame: DataFrame) -> bool:
        assert isinstance(frame, DropFrame)
        if not self.raw_open or self.busy:
            return False
        self.out.append(("now", frame.session, time.monotonic()))
        return True

    def forget(self, session: str) -> None:
        pass

    async def close(self) -> None:
        pass


def drop(session: str) -> DropFrame:
    return DropFrame(Epoch(1, "a"), session)


async def test_a_raw_links_frames_leave_at_once_and_never_past_held_ones() -> None:
    """A raw link's reader keeps the delay (LateReading), so its frames leave the sender as
    undelayed ones do; frames held here for a WebSocket go first, whatever opens meanwhile."""
    inner, alarms = Recorded(), Alarms()
    addr = "10.0.0.2:7117"
    async with asyncio.TaskGroup() as tg:
        links = DelayedLinks(inner, Delays(1, {"10.0.0.2": 2}), tg, alarms)  # type: ignore[arg-type]
        await links.send(addr, drop("s0"))  # no raw link yet: held 3 ms, then the sender
        inner.raw_open = True
        assert not links.send_now(addr, drop("s1"))  # not past s0
        await links.send(addr, drop("s1"))  # behind s0, held too
        while len(inner.out) < 2:
            await asyncio.sleep(0.001)
        sent = time.monotonic()
        assert links.send_now(addr, drop("s2"))
        await links.send(addr, drop("s3"))  # the raw link's sender, at once
        await links.close()
    alarms.close()
    assert [(how, s) for how, s, _ in inner.out] == [
        ("sender", "s0"), ("sender", "s1"), ("now", "s2"), ("sender", "s3")
    ]  # fmt: skip
    assert inner.out[3][2] - sent < 0.003 + 0.01  # the sender's 10 ms, no delay


class Reader(asyncio.Protocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, float]] = []
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.got.append((data, time.monotonic()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class TransportFrom:
    """A transport's one fact LateReading reads: who is at the other end."""

    def __init__(self, host: str) -> None:
        self.host = host

    def get_extra_info(self, name: str) -> tuple[str, int] | None:
        return (self.host, 40000) if name == "peername" else None


async def test_a_raw_links_reader_takes_its_bytes_the_delay_late_and_its_end_after_them() -> None:
    alarms, inner = Alarms(), Reader()
    late = LateReading(inner, Delays(1, {"10.0.0.2": 2}), alarms)
    late.connection_made(TransportFrom("10.0.0.2"))  # type: ignore[arg-type]
    start = time.monotonic()
    for chunk in (b"ab", b"cd", b"ef"):
        late.data_received(chunk)
    late.connection_lost(None)
    assert inner.got == [] and inner.lost == []
    while not inner.lost:
        await asyncio.sleep(0.001)
    assert [d for d, _ in inner.got] == [b"ab", b"cd", b"ef"] and inner.lost == [None]
    assert all(t - start >= 0.003 for _, t in inner.got)
    local = Reader()
    here = LateReading(local, Delays(1, {"10.0.0.2": 2}), alarms)
    # A host not in the table (this peer): no link, no delay.
    here.connection_made(TransportFrom("127.0.0.1"))  # type: ignore[arg-type]
    here.data_received(b"x")
    assert [d for d, _ in local.got] == [b"x"]
    alarms.close()


async def test_alarms_keep_sub_millisecond_waits_in_order() -> None:
    """The event loop's timers wait whole milliseconds at least; a 0.2 ms link must not
    hold each frame five times its delay."""
    alarms, fired = Alarms(), []
    set_at = time.monotonic()
    for i, ms in enumerate((0.6, 0.2, 0.2, 0.4)):
        alarms.after(ms / 1000, functools.partial(fired.append, i))
    late = []
    for _ in range(30):
        done = asyncio.get_running_loop().create_future()
        start = time.monotonic()
        alarms.after(0.0002, functools.partial(done.set_result, None))
        await done
        late.append(time.monotonic() - start - 0.0002)
    alarms.after(0.001, functools.partial(fired.append, "after close"))
    alarms.close()
    await asyncio.sleep(0.01)
    assert fired == [1, 2, 3, 0]
    assert min(late) >= 0 and time.monotonic() - set_at >= 0.0006
    assert statistics.median(late) < 0.0005, late
