"""An answer's frames at its origin: the waiter wakes in the loop's next turn on a frame, a
change of the mesh or its timeout, whichever comes first, and takes frames in order."""

from __future__ import annotations

import asyncio

from meshshard.chain.inbox import Inbox, next_frame
from meshshard.clock import Pulse
from meshshard.types import Epoch
from meshshard.wire import TokenFrame


def token(step: int) -> TokenFrame:
    return TokenFrame(Epoch(1, "a"), "s", step, (step,))


async def turn() -> None:
    await asyncio.sleep(0)


async def test_a_frame_reaches_its_waiter_in_the_next_turn() -> None:
    # With a task per thing awaited (asyncio.wait) this took several turns, and on a stage
    # running passes on the loop each turn held a pass (docs/experiments/token-bunching.txt).
    inbox, pulse = Inbox(), Pulse()
    waiting = asyncio.create_task(next_frame(inbox, pulse, pulse.version, 60.0))
    await turn()
    inbox.put(token(0))
    await turn()
    assert waiting.done() and waiting.result() == token(0)


async def test_frames_already_there_come_first_and_in_order() -> None:
    inbox, pulse = Inbox(), Pulse()
    for step in range(3):
        inbox.put(token(step))
    pulse.fire()  # a change does not hide what came before it
    got = [await next_frame(inbox, pulse, 0, 60.0) for _ in range(3)]
    assert got == [token(0), token(1), token(2)] and inbox.empty()


async def test_a_change_of_the_mesh_wakes_the_waiter_with_nothing() -> None:
    inbox, pulse = Inbox(), Pulse()
    seen = pulse.version
    waiting = asyncio.create_task(next_frame(inbox, pulse, seen, 60.0))
    await turn()
    pulse.fire()
    await turn()
    assert waiting.done() and waiting.result() is None
    # A change before the wait began is not waited for.
    assert await asyncio.wait_for(next_frame(inbox, pulse, seen, 60.0), 1.0) is None


async def test_the_timeout_wakes_the_waiter_and_a_later_frame_is_kept() -> None:
    inbox, pulse = Inbox(), Pulse()
    assert await asyncio.wait_for(next_frame(inbox, pulse, pulse.version, 0.01), 1.0) is None
    inbox.put(token(5))  # nobody waits now: it stays for the next look
    assert await next_frame(inbox, pulse, pulse.version, 0.0) == token(5)


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    inbox, pulse = Inbox(), Pulse()
    waiting = asyncio.create_task(next_frame(inbox, pulse, pulse.version, 60.0))
    await turn()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()
    inbox.put(token(1))  # no stale future to resolve
    pulse.fire()
    assert inbox.pop() == token(1)
