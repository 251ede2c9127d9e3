"""The model thread yields the CPU to the event loop (gossip and probes) where both want it."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from meshshard.chain.worker import MODEL_NICE, run_model


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
async def test_model_work_runs_below_the_event_loop() -> None:
    loop_nice = nice_of_this_thread()
    model_nice = await run_model(nice_of_this_thread)
    assert model_nice == min(19, loop_nice + MODEL_NICE)
    assert nice_of_this_thread() == loop_nice  # the loop's own priority is untouched
