"""One thread for all model work of a peer (imports, loading, profiling, forward passes).

transformers' lazy imports are not thread-safe, and a peer runs one stage at a time anyway:
serialising torch work on one thread keeps it correct and keeps the event loop free.

The thread runs at a lower scheduling priority than the event loop. On a slow host (a phone
given a sliver of a core) the model's work would otherwise take the CPU from the loop, probes
would go unanswered for seconds and the others would declare a live peer dead. Nice only
matters while both want the CPU: an idle loop leaves the model all of it.

Nice cannot help while the model thread holds the GIL, and a full garbage collection holds it
throughout: with torch and transformers imported it walks hundreds of thousands of objects,
and the allocations of imports, profiling and loading set off many of them
(tools/bench_stalls.py: five stalls of 0.24 to 0.85 s in one start-up at 0.15 of a core; the
phone of the home-wifi testbed was declared dead for such). So setup work runs with the
collector paused (`run_setup`), and the imported code, which lives as long as the process,
is frozen once (`run_imports`, `gc.freeze` as pre-fork servers do): later collections walk
only what was made since.

A short pass may run on the event loop itself instead (`run_inline`), when the model thread
has nothing to do. A pass of SmolLM2's layers calls torch hundreds of times, and each call
lets go of the GIL: whatever the loop does meanwhile (a token's copy for the origin, probes,
frames of other sessions) takes it at one of those moments and the pass waits for it back.
On this project's 2-core test machine a 3-peer chain decoded one answer at 0.927 and 0.911 of
the single process with short passes on the loop, 0.903 and 0.902 with them in the model
thread, in turns (docs/benchmarks/chain-runs.txt). The loop then waits for the pass; the
caller keeps that to passes short beside a probe's timeout.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger(__name__)

MODEL_NICE = 10  # the loop then gets about nine tenths of a CPU both want (CFS weights)


def _below_the_loop() -> None:
    # Linux sets nice per thread (a thread id for a process id), and threads the model thread
    # starts (torch's intra-op pool) inherit it. Elsewhere this is not per thread: leave it.
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + MODEL_NICE)
    except OSError as e:
        logger.warning("could not lower the model thread's priority: %s", e)


_executor = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="model", initializer=_below_the_loop
)


# Calls given to the model thread that have not ended there: counted out by the thread itself,
# since a caller cancelled while its call runs resumes before the call ends.
_handed = 0
_handed_lock = threading.Lock()


def _count_out() -> None:
    global _handed
    with _handed_lock:
        _handed -= 1


def _counted(fn: Callable[[], T]) -> T:
    try:
        return fn()
    finally:
        _count_out()


async def run_model(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    global _handed
    with _handed_lock:
        _handed += 1
    job = _executor.submit(_counted, functools.partial(fn, *args, **kwargs))
    try:
        return await asyncio.wrap_future(job)
    finally:
        if job.cancel():  # taken back before it started: it will not count itself out
            _count_out()


def model_idle() -> bool:
    """Whether the model thread has nothing to do: model work may then run on the loop."""
    return not _handed


async def run_inline(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`run_model` for short work, on the event loop while the model thread is idle: model
    work stays one call at a time (nothing can be handed to the thread while the loop runs
    this), and a pass does not share the GIL with the loop. It does not yield: a caller
    that runs one after another lets the loop run between them (sockets, timers), once it
    has queued what it must send."""
    if _handed:
        return await run_model(fn, *args, **kwargs)
    return fn(*args, **kwargs)


async def run_setup(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`run_model` for work that allocates much (loading, profiling): no collection midway;
    the next one walks what it left, which is small beside the frozen imports."""
    return await run_model(_paused, functools.partial(fn, *args, **kwargs), freeze=False)


async def run_imports(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`run_setup` for imports: what they make lives as long as the process, so it is frozen
    out of every later collection. (What the event loop made meanwhile is frozen with it:
    little, and reference counting still frees it.)"""
    return await run_model(_paused, functools.partial(fn, *args, **kwargs), freeze=True)


def _paused(fn: Callable[[], T], freeze: bool) -> T:
    was = gc.isenabled()
    gc.disable()
    try:
        return fn()
    finally:
        if freeze:
            gc.freeze()
        if was:
            gc.enable()
