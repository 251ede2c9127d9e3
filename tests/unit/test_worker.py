"""The model thread leaves the event loop (gossip and probes) the CPU where both want it, and
the GIL while it sets up; short work runs on the loop only while that thread is idle, so model
work stays one call at a time."""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
import sys
import threading

import pytest

from meshshard.chain.worker import MODEL_NICE, run_imports, run_inline, run_model, run_setup


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread on Linux only")
async def test_model_work_runs_below_the_event_loop() -> None:
    loop_nice = nice_of_this_thread()
    model_nice = await run_model(nice_of_this_thread)
    assert model_nice == min(19, loop_nice + MODEL_NICE)
    assert nice_of_this_thread() == loop_nice  # the loop's own priority is untouched


def collector_state() -> tuple[bool, int]:
    return gc.isenabled(), gc.get_freeze_count()


async def test_setup_work_runs_without_collections_and_leaves_nothing_frozen() -> None:
    before = gc.get_freeze_count()
    during, frozen_during = await run_setup(collector_state)
    assert not during  # a collection would hold the GIL for the whole of it
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen_during == before  # loads and profiles are freed later


async def test_imports_are_frozen_out_of_later_collections() -> None:
    module = await run_imports(importlib.import_module, "json.tool")
    try:
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        frozen = {id(o) for o in gc.get_objects(generation=2)}
        assert id(module.main) not in frozen  # no longer walked by any generation
    finally:
        gc.unfreeze()


async def test_a_failing_setup_still_turns_the_collector_back_on() -> None:
    with pytest.raises(ZeroDivisionError):
        await run_setup(lambda: 1 / 0)
    assert gc.isenabled()


async def test_short_work_runs_on_the_loop_unless_the_model_thread_has_work_in_hand() -> None:
    loop_thread = threading.get_ident()
    model_thread = await run_model(threading.get_ident)
    assert model_thread != loop_thread
    assert await run_inline(threading.get_ident) == loop_thread
    release = threading.Event()
    asyncio.get_running_loop().call_later(0.1, release.set)
    busy = asyncio.create_task(run_model(release.wait, 5))
    await asyncio.sleep(0)  # the long call is in the model thread now
    # Behind the work in hand, in its thread; never beside it on the loop.
    assert await run_inline(threading.get_ident) == model_thread
    assert release.is_set()
    assert await busy
    assert await run_inline(threading.get_ident) == loop_thread


async def test_a_call_whose_caller_gave_up_keeps_short_work_off_the_loop_until_it_ends() -> None:
    """The caller resumes at once; the call runs on in the thread, and work beside it on the
    loop could touch what it touches (a cache being handed over)."""
    loop_thread = threading.get_ident()
    release = threading.Event()
    caller = asyncio.create_task(run_model(release.wait, 5))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    asyncio.get_running_loop().call_later(0.1, release.set)
    assert await run_inline(threading.get_ident) != loop_thread
    assert release.is_set()
    assert await run_inline(threading.get_ident) == loop_thread
