"""The watch on a peer's own event loop counts and logs stalls long enough to cost probes."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from meshshard.stalls import StallWatch


def test_only_stalls_past_the_threshold_count(caplog: pytest.LogCaptureFixture) -> None:
    watch = StallWatch(threshold=0.4)
    with caplog.at_level(logging.WARNING):
        for late in (0.01, 0.39, 0.4, 1.42, 0.2):
            watch.observe(late)
    assert (watch.count, watch.longest) == (2, 1.42)
    assert "stalled for 1.42 s" in caplog.text


async def test_a_blocked_loop_is_seen() -> None:
    watch = StallWatch(threshold=0.15)
    task = asyncio.create_task(watch.run(asyncio.sleep))
    await asyncio.sleep(0.1)
    time.sleep(0.3)  # what a thread holding the GIL does to the loop
    await asyncio.sleep(0.1)
    task.cancel()
    assert watch.count == 1 and 0.15 <= watch.longest < 0.5
