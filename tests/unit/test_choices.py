"""The `n` choices of one API request: pieces merged as they come, errors raised where the
request can answer with them, every choice's session ended on the way out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from meshshard.api.choices import Choices
from meshshard.chain.origin import ChainBusy, ChainError


class Script:
    """A choice's source that yields its pieces when told, and notes that it was closed."""

    def __init__(self, pieces: list[str], fail: Exception | None = None) -> None:
        self.pieces, self.fail = pieces, fail
        self.go = asyncio.Queue[None]()
        self.closed = False

    async def run(self) -> AsyncGenerator[tuple[str, str | None], None]:
        try:
            for k, piece in enumerate(self.pieces):
                await self.go.get()
                yield piece, "stop" if k == len(self.pieces) - 1 else None
            if self.fail is not None:
                await self.go.get()
                raise self.fail
        finally:
            self.closed = True

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            self.go.put_nowait(None)


async def test_pieces_come_in_the_order_they_arrive_each_choice_in_its_own() -> None:
    a, b = Script(["a0", "a1", "a2"]), Script(["b0", "b1"])
    choices = Choices([a.run(), b.run()])
    try:
        a.step(2)  # a gives two pieces before b's first
        await asyncio.sleep(0)
        b.step()
        await choices.started()
        a.step()
        b.step()
        got = [item async for item in choices.pieces()]
    finally:
        await choices.aclose()
    assert got[:3] == [(0, "a0", None), (0, "a1", None), (1, "b0", None)]
    assert [g for g in got if g[0] == 0] == [(0, "a0", None), (0, "a1", None), (0, "a2", "stop")]
    assert [g for g in got if g[0] == 1] == [(1, "b0", None), (1, "b1", "stop")]
    assert a.closed and b.closed


async def test_an_error_before_every_first_piece_is_raised_and_ends_every_choice() -> None:
    ok, busy = Script(["x", "y"]), Script([], fail=ChainBusy("full", 2.0))
    choices = Choices([ok.run(), busy.run()])
    ok.step()
    busy.step()
    with pytest.raises(ChainBusy):
        await choices.started()
    await choices.aclose()
    assert ok.closed and busy.closed  # the first choice's session ends though it had begun


async def test_an_error_after_the_start_is_raised_from_the_pieces() -> None:
    ok, lost = Script(["x", "y"]), Script(["z"], fail=ChainError("a stage is gone"))
    choices = Choices([ok.run(), lost.run()])
    try:
        ok.step()
        lost.step(2)
        await choices.started()
        with pytest.raises(ChainError, match="a stage is gone"):
            async for _ in choices.pieces():
                pass
    finally:
        await choices.aclose()
    assert ok.closed and lost.closed


async def test_closing_while_choices_run_ends_them_and_leaves_no_task() -> None:
    a, b = Script(["a0", "a1"]), Script(["b0", "b1"])
    before = len(asyncio.all_tasks())
    choices = Choices([a.run(), b.run()])
    a.step()
    b.step()
    await choices.started()
    await choices.aclose()  # a client hung up: neither gives its second piece
    assert a.closed and b.closed
    assert len(asyncio.all_tasks()) == before
