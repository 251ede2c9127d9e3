"""What a data-plane socket remembers of the answers it carried, to tell their origins should
it close under them (pure)."""

from __future__ import annotations

import torch

from meshshard.chain.inflight import MOST_ANSWERS, InFlight
from meshshard.chain.tensors import to_wire
from meshshard.types import Epoch
from meshshard.wire import (
    DropFrame,
    ErrorCode,
    ErrorFrame,
    PickFrame,
    Sampling,
    StepFrame,
    TokenFrame,
)

EPOCH = Epoch(3, "a")
ORIGIN, NEXT = "127.0.0.1:1", "127.0.0.1:2"


def step(session: str, number: int, attempt: int = 0) -> StepFrame:
    ids = to_wire(torch.tensor([1], dtype=torch.int64))
    return StepFrame(EPOCH, session, number, 10, ids, ORIGIN, True, Sampling(0.0, 1.0, 0), attempt)


def test_each_answer_carried_is_told_once_of_its_latest_try_by_its_origin() -> None:
    carried = InFlight()
    carried.sent(NEXT, step("a", 4))
    carried.sent(NEXT, step("b", 1))
    carried.sent(NEXT, step("a", 5, attempt=1))  # a's newer try replaces its older
    carried.sent(NEXT, TokenFrame(EPOCH, "c", 7, (9,), 2))  # a token: to its origin, NEXT
    carried.sent(NEXT, DropFrame(EPOCH, "d"))  # nobody waits on a drop
    carried.sent(NEXT, PickFrame(EPOCH, "e", 2, (5,), (0.5,)))  # ... nor on a pick alone
    lost = carried.lost("closed: 1009")
    assert lost == [
        (ORIGIN, ErrorFrame(EPOCH, "b", 1, ErrorCode.INTERNAL, "closed: 1009", 0)),
        (ORIGIN, ErrorFrame(EPOCH, "a", 5, ErrorCode.INTERNAL, "closed: 1009", 1)),
        (NEXT, ErrorFrame(EPOCH, "c", 7, ErrorCode.INTERNAL, "closed: 1009", 2)),
    ]
    assert carried.lost("again") == []  # told once


def test_a_socket_remembers_a_bounded_number_of_answers_the_latest_kept() -> None:
    carried = InFlight()
    for i in range(MOST_ANSWERS + 10):
        carried.sent(NEXT, step(f"s{i}", 1))
    sessions = [error.session for _, error in carried.lost("gone")]
    assert len(sessions) == MOST_ANSWERS and sessions[-1] == f"s{MOST_ANSWERS + 9}"
    assert "s9" not in sessions and "s10" in sessions


def test_an_answer_that_is_over_is_not_told_of_its_frames() -> None:
    """Its drop came (the origin ended it): a socket closing later is no loss of its. Before,
    a peer's graceful leave closed sockets that had carried every recent answer, each then
    'lost' in a warning and its origin told."""
    carried = InFlight()
    carried.sent(NEXT, step("over", 8))
    carried.sent(NEXT, TokenFrame(EPOCH, "over", 9, (4,)))  # its last token, to NEXT
    carried.sent(NEXT, step("live", 3))
    carried.forget("over")
    carried.forget("never carried")
    assert [(origin, e.session) for origin, e in carried.lost("closed")] == [(ORIGIN, "live")]
