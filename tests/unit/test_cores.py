"""Where a split head's first-stage pick runs on a host it shares with the last stage
(chain/cores.py): the choice, pure, and the move itself on this host's real cores."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from meshshard.chain import cores

HOST = 77


def test_only_a_sender_on_our_core_of_our_host_moves_us_to_the_others() -> None:
    allowed = {0, 1, 2}
    assert cores.elsewhere((HOST, 1), (HOST, 1), allowed) == {0, 2}
    assert cores.elsewhere((HOST, 1), (HOST, 0), allowed) is None  # already apart
    assert cores.elsewhere((HOST + 1, 1), (HOST, 1), allowed) is None  # another host's core 1
    assert cores.elsewhere(None, (HOST, 1), allowed) is None  # the sender named none
    assert cores.elsewhere((HOST, 1), None, allowed) is None  # we cannot tell ours
    assert cores.elsewhere((HOST, 1), (HOST, 1), {1}) is None  # nowhere else to go


def in_thread(work: Callable[[], object]) -> object:
    """`work`'s result on a thread of its own: affinity is per thread, and the test's own
    thread keeps its cores."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join(10)
    assert out, "the thread did not finish"
    return out[0]


needs_cores = pytest.mark.skipif(
    cores.here() is None or len(os.sched_getaffinity(0)) < 2,
    reason="moving off a core needs Linux and two cores to choose from",
)


@needs_cores
def test_a_thread_woken_on_the_senders_core_runs_the_block_elsewhere_then_anywhere() -> None:
    def work() -> tuple[bool, int, int, set[int], set[int]]:
        before = os.sched_getaffinity(0)
        for _ in range(20):  # the scheduler may move the thread between the two looks
            sender = cores.here()
            assert sender is not None
            with cores.apart(sender) as moved:
                during = cores.here()
                assert during is not None
                inside = os.sched_getaffinity(0)
            if moved:
                break
        return moved, sender[1], during[1], inside, before ^ os.sched_getaffinity(0)

    moved, sender, during, inside, changed = in_thread(work)  # type: ignore[misc]
    assert moved and during != sender and sender not in inside
    assert not changed  # its cores as before


@needs_cores
def test_a_sender_elsewhere_or_a_thread_with_one_core_stays_put() -> None:
    def work() -> tuple[bool, bool, bool]:
        me = cores.here()
        assert me is not None
        with cores.apart((me[0] + 1, me[1])) as other_host:
            pass
        pinned = {me[1]}
        os.sched_setaffinity(0, pinned)
        with cores.apart(cores.here()) as one_core:
            assert os.sched_getaffinity(0) == pinned
        with cores.apart(None) as unnamed:
            pass
        return other_host, one_core, unnamed

    assert in_thread(work) == (False, False, False)
