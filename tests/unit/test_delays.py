"""The testbed's transport delay: parsed from its variable, one way per end of a link."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from support.dataplane import Unwatched, ignore, origin_at

from meshshard.chain.channel import FrameCodec
from meshshard.chain.links import Links, Refusals
from meshshard.delays import ENV, DelayedLinks, Delays
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
        links = DelayedLinks(
            Links(http, ignore, Unwatched(), tg, codec, Refusals(), 5.0), delays, tg
        )
        sent = time.monotonic()
        for i in range(3):
            await links.send(addr, DropFrame(Epoch(1, "a"), f"s{i}"))
        assert time.monotonic() - sent < 0.05
        while len(arrived) < 3 and time.monotonic() - sent < 5:
            await asyncio.sleep(0.01)
        await links.close()
    assert [s for s, _ in arrived] == ["s0", "s1", "s2"]
    assert all(t - sent >= 0.1 for _, t in arrived)
