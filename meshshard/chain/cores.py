"""Where a split head's two picks run when the stages share a host.

A lone answer's head is split so that its two shares are scored at once, the last stage's
on its core and the first stage's on another (chain/picks.py). When the two stages share a
host (the demo, the benchmark, a desktop running a few peers), the hidden states' arrival
wakes the first stage, and a socket's wake-up tells Linux's scheduler that the sender is
about to sleep, so it may place the woken task on the sender's core. The sender does not
sleep: it scores its own share. The two picks then take turns on one core until the load
balancer moves one, up to a tick later (4 ms at HZ=250). On the 2-core test host that
happened in about a third of a lone answer's tokens, whose picks then took 7.2-7.8 ms each
instead of 4.8-4.9 (docs/experiments/cores.txt).

So the sender names where it runs, (host, core), with the hidden states, and the first
stage, woken on that core of the same host, moves its thread off it for its pick, then lets
it run anywhere again. A host is its kernel's boot id: containers sharing a kernel share a
scheduler too. Elsewhere than Linux, nothing is named and nothing moves.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from meshshard.wire.data import MAX_HOST

logger = logging.getLogger(__name__)

Core = tuple[int, int]  # (host, core): the host's tag and a core's number


def _host() -> int:
    try:
        boot = uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except (OSError, ValueError):
        return 0
    return boot.int % (MAX_HOST - 1) + 1


def _getcpu() -> Callable[[], int] | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "sched_getcpu", None)
    except OSError:
        return None


HOST = _host()
_sched_getcpu = _getcpu()


def here() -> Core | None:
    """The core the calling thread runs on now, on this host; None where unknown."""
    if not HOST or _sched_getcpu is None:
        return None
    cpu = _sched_getcpu()
    return (HOST, cpu) if cpu >= 0 else None


def elsewhere(sender: Core | None, me: Core | None, allowed: set[int]) -> set[int] | None:
    """The cores to run on, away from the sender's, when it and we are on the same core of
    one host and another is allowed; None: stay."""
    if sender is None or me is None or sender != me:
        return None
    rest = allowed - {me[1]}
    return rest or None


@contextlib.contextmanager
def apart(sender: Core | None) -> Iterator[bool]:
    """Run the block off `sender`'s core if we woke on it (True), then let the thread run
    on any of its cores again."""
    me = here() if sender is not None else None
    if me is None or me != sender:  # the usual case costs no system call
        yield False
        return
    allowed = os.sched_getaffinity(0)
    to = elsewhere(sender, me, allowed)
    if to is None:
        yield False
        return
    try:
        os.sched_setaffinity(0, to)  # this thread only: Linux moves it before returning
    except OSError as e:
        logger.debug("could not move off core %d: %s", me[1], e)
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, allowed)
